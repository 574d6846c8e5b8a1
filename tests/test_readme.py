"""The README's first Python block is the design card's three lines, and they run as written on the
shipped tiny-dlm with every default."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
THREE_LINES = [
    "with attnprobe.record(model) as store:",
    "    attnprobe.calibrate(model, ids, mask_token_id=model.config.mask_token_id)",
    "prune.apply(model, store, 0.5)",
]


def _first_python_block() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, flags=re.S)
    assert block, "README.md has no ```python block"
    return block.group(1).rstrip("\n").split("\n")


def test_readme_starts_with_the_two_shell_commands_then_the_three_lines():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.index("```bash") < text.index("```python")
    assert _first_python_block() == THREE_LINES


def test_the_three_lines_run_on_the_shipped_model_with_defaults():
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        ROOT / "examples" / "models" / "tiny-dlm", local_files_only=True
    ).eval()
    ids = load_file(str(ROOT / "examples" / "data" / "heldout.safetensors"))["input_ids"][:2, :64]
    import attnprobe
    import prune

    namespace = {"attnprobe": attnprobe, "prune": prune, "model": model, "ids": ids, "torch": torch}
    exec("\n".join(THREE_LINES), namespace)  # the lines exactly as the README and the issue give them
    store = namespace["store"]
    assert "steps=" in repr(store) and "Recording object" not in repr(store)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert linears and all(abs((m.weight == 0).float().mean().item() - 0.5) < 0.01 for m in linears)
