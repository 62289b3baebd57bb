"""Client-side training (`local`), held-out evaluation (`evaluate`), and answer-quality metrics
against references (`metrics`: ROUGE-L, repetition, length), which every round and `covey eval`
score with."""
