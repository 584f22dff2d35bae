"""Training a method: the loop (`train`), a run's folder (`workdir`) and how a run is opened
(`runs`), checkpoints (`checkpoint`) and stopping (`preemption`), evaluation (`evaluate`), the
label audit's passes the trainer writes (`audit_passes`), TensorBoard files (`summaries`), the
figures (`figures`), and the model of a run trained before runs saved one (`export`)."""
