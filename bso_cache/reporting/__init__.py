"""What a run tells a person: evaluation from cached log-probs and by generation, model cards,
plots, experiment trackers, and the embedded demo."""
