"""The adapter merged into the base weights: a plain transformers folder, no PEFT needed.

`merge_and_unload` adds each LoRA update (B @ A * alpha / r) into the layer it adapts, so the
exported model computes what base + adapter computed, at the base model's speed. The base is
loaded unquantized for this (merging into 4/8-bit weights would round the update away), and the
folder is written atomically: a failed export leaves no half-written model, and with
`overwrite` the previous export survives until the new one is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from covey.atomic import atomic_directory, check_output_dir
from covey.serve.adapters import ADAPTER_WEIGHTS, AdapterSource, load_adapter

log = logging.getLogger("covey.serve")

EXPORT_RECORD = "covey_export.json"


@dataclass(frozen=True)
class ExportResult:
    out: Path
    base_id: str
    parameters: int


def export_merged(source: AdapterSource, out: Path, overwrite: bool = False) -> ExportResult:
    """Merge `source`'s adapter into its base and save model, tokenizer and provenance to `out`."""
    out = Path(out)
    check_output_dir(out, overwrite)  # before the slow load
    model_cfg = replace(source.cfg.model, quantization="none")
    if source.cfg.model.quantization != "none":
        log.info("loading the base unquantized for the merge (run used %s)", model_cfg.quantization)
    loaded = load_adapter(source, model_cfg)
    base_id, tokenizer = loaded.base_id, loaded.tokenizer
    merged = loaded.model.merge_and_unload()
    merged.train(False)
    adapter_bytes = (source.adapter_dir / ADAPTER_WEIGHTS).read_bytes()
    record = {
        "base_model": base_id,
        "model.base": source.cfg.model.base,
        "adapter": str(source.adapter_dir.resolve()),
        "adapter_label": source.label,
        "adapter_sha256": hashlib.sha256(adapter_bytes).hexdigest(),
        "run": str(source.run_dir.resolve()) if source.run_dir is not None else None,
        "round": source.round_index,
        "prompt_template": source.cfg.prompt.template,
    }
    with atomic_directory(out, overwrite=overwrite) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return ExportResult(out=out, base_id=base_id, parameters=int(merged.num_parameters()))
