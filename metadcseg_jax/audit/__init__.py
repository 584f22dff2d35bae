"""The label audit (`metadcseg-audit`): which training masks are wrong. The trainer writes the
passes (`metadcseg_jax.training.audit_passes`); here they are averaged and measured
(`scores`), reported (`report`) and compared with cleanlab (`cleanlab_ref`)."""
