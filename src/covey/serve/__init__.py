"""Serving a trained adapter: the Gradio comparison app, one-shot answers, and merged exports.

Modules (each imports torch, transformers or gradio only when used, so the CLI starts fast):

- `adapters`: which adapter to serve (run folder and round, or a base and an adapter folder),
  the checks that it fits its base, and loading it onto the base.
- `generate`: decoding presets and one resident model answering with the adapter on, off, or
  both in one batch, streamed.
- `app`: the Gradio app: base and fine-tuned answers side by side, and the run's rounds.
- `export`: the adapter merged into the base weights, saved as a plain transformers folder.
- `commands`: the `covey serve`, `covey generate` and `covey export` commands.
"""
