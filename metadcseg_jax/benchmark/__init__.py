"""The benchmark (`metadcseg-benchmark`): methods x label-noise levels x seeds. The grid and
its presets (`presets`), the runs and their worker processes (`runner`), the table cells and
their paired comparisons (`tables`, with the statistics in `stats`), the Markdown, JSON and
plot (`report`), and the label-noise corruption table (`corruption`)."""
