"""Serving a trained adapter: the Gradio comparison app, one-shot answers, and merged exports.

Modules (each imports torch, transformers or gradio only when used, so the CLI starts fast):

- `generate`: which adapter to serve (run folder and round, or a base and an adapter folder),
  the checks that it fits its base, and one resident model answering with or without it.
- `app`: the Gradio app: base and fine-tuned answers side by side, and the run's rounds.
- `export`: the adapter merged into the base weights, saved as a plain transformers folder.
- `commands`: the `covey serve`, `covey generate` and `covey export` commands.
"""
