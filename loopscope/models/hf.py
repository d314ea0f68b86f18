"""``from_hf``: a supported HF looped LM -> a loopscope Loop; ``load_hf``: a local HF directory.

Supported classes (one adapter module each, limitations in its docstring):

* ``Inkling2LoopForCausalLM`` -> :class:`loopscope.models.inkling2.Inkling2Loop` (one step = one
  pass; hooks ``core.hook_*`` labelled ``(pass, layer)``).
* ``HrmTextForCausalLM`` -> the slow Loop of :mod:`loopscope.models.hrm_text` (one step = one
  H-cycle, through a TransformerLens ``TransformerBridge``; L hooks labelled
  ``(h_cycle, l_cycle)``); ``loop.fast_loop(z_H)`` gives the L-pass Loop.

Example:
    >>> from loopscope.models.inkling2 import build_tiny_inkling2
    >>> loop = from_hf(build_tiny_inkling2())
    >>> type(loop).__name__, loop.label_names
    ('Inkling2Loop', ('pass', 'layer'))
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from loopscope.core.errors import LoopscopeError, did_you_mean
from loopscope.core.loop import Loop

__all__ = ["from_hf", "load_hf", "is_hf_dir", "promote_float32", "local_tokenizer", "SUPPORTED"]

_TOKENIZER_DIR: tempfile.TemporaryDirectory | None = None
_OFFLOAD_DIR: tempfile.TemporaryDirectory | None = None

#: HF class name -> the loopscope adapter module
SUPPORTED = {
    "Inkling2LoopForCausalLM": "loopscope.models.inkling2",
    "HrmTextForCausalLM": "loopscope.models.hrm_text",
}


@did_you_mean
def from_hf(model: Any, *, tokenizer: Any = None) -> Loop:
    """The loopscope Loop of a supported HF looped LM (weights shared, never copied).

    Args:
        model: an HF model instance of one of :data:`SUPPORTED`.
        tokenizer: the model's tokenizer (HRM-Text's bridge holds one; a local id-only stand-in
            is used when None, never a download).
    """
    name = type(model).__name__
    if name == "Inkling2LoopForCausalLM":
        from loopscope.models.inkling2 import Inkling2Loop

        return Inkling2Loop(model)
    if name == "HrmTextForCausalLM":
        from loopscope.models.hrm_text import bridge_hrm_text, hrm_text_loop

        return hrm_text_loop(bridge_hrm_text(model, tokenizer)).slow
    raise LoopscopeError(
        f"from_hf does not support {name}; supported: {', '.join(SUPPORTED)} "
        "(any other looped module: loopscope.wrap)"
    )


def is_hf_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory with an HF ``config.json`` (one naming ``architectures``)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "architectures" in data


@did_you_mean
def load_hf(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: str | dict[Any, str | int] | None = None,
    offload_folder: str | Path | None = None,
) -> Loop:
    """Load a local HF checkpoint directory (safetensors only, offline) and return its Loop.

    A model larger than one device is split by HF accelerate: pass ``device_map="auto"`` (or a
    map of module names to ``"cpu"`` / ``"cuda:0"`` / ``"disk"``) and a ``max_memory`` budget;
    layers that do not fit are offloaded to ``offload_folder`` and streamed in at each call.
    Capture, patching and the logit lens run on such a Loop; Jacobian analyses (spectra,
    solvers, Lyapunov) need the weights in memory and refuse an offloaded model.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (a tokenizer there is used).
        device: torch device for the weights (without ``device_map``).
        dtype: "float32" | "float64" | "bfloat16" | "float16" (default: the checkpoint's).
        device_map: accelerate's placement, ``"auto"`` or ``{module: device}`` (needs the
            ``accelerate`` package); implied ``"auto"`` when ``max_memory`` is given.
        max_memory: budget per device, e.g. ``"2GiB"`` or bytes (every device present) or
            ``{"cpu": "2GiB", 0: "20GiB"}``.
        offload_folder: where offloaded weights go (default: a temporary folder that lives as
            long as the process).

    Example:
        >>> loop = load_hf("ckpt/", max_memory="200MiB")  # doctest: +SKIP
        >>> ls.unroll(loop, ids, 3, capture="core.hook_resid_post")  # doctest: +SKIP
    """
    import transformers

    p = Path(path)
    if not is_hf_dir(p):
        raise LoopscopeError(f"{p} is not an HF checkpoint directory (no config.json)")
    if not list(p.glob("*.safetensors")):
        found = "a .bin checkpoint" if list(p.glob("*.bin")) else "no weights"
        raise LoopscopeError(f"{p} has {found}; loopscope loads safetensors only (never unpickles)")
    arch = json.loads((p / "config.json").read_text())["architectures"][0]
    if arch not in SUPPORTED:
        raise LoopscopeError(f"{p}: {arch} is not supported; supported: {', '.join(SUPPORTED)}")
    torch_dtype = None if dtype is None else getattr(torch, dtype, None)
    if dtype is not None and not isinstance(torch_dtype, torch.dtype):
        raise LoopscopeError(f"unknown dtype {dtype!r}; use float32, float64, bfloat16 or float16")
    cls = getattr(transformers, arch)
    if device_map is None and max_memory is None:
        # load in the checkpoint's dtype, then cast everything: HF's keep-in-fp32 lists would
        # otherwise leave float32 modules in a float64 model
        model = cls.from_pretrained(p, local_files_only=True, use_safetensors=True)
        model = model.to(device=device, dtype=torch_dtype) if torch_dtype else model.to(device)
    else:
        model = _load_dispatched(
            cls, p, torch_dtype, device, device_map, max_memory, offload_folder
        )
    tok = None
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(p, local_files_only=True)
    loop = from_hf(model.eval(), tokenizer=tok)
    loop.tokenizer = tok
    return loop


def _load_dispatched(cls, path, torch_dtype, device, device_map, max_memory, offload_folder):
    """``from_pretrained`` split across devices / disk by accelerate (validated first)."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise LoopscopeError(
            "device_map / max_memory need the accelerate package: pip install accelerate"
        ) from None
    if device != "cpu":
        raise LoopscopeError(f"pass device_map or device, not both (device={device!r})")
    if torch_dtype is torch.float64:
        raise LoopscopeError(
            "dtype float64 is for Jacobian analyses, which need the weights in memory; "
            "load without device_map / max_memory"
        )
    if device_map is not None and not isinstance(device_map, (str, dict)):
        raise LoopscopeError(f"device_map must be 'auto' or a dict, got {device_map!r}")
    if isinstance(max_memory, (str, int)) and not isinstance(max_memory, bool):
        devices = ["cpu", *range(torch.cuda.device_count())]
        max_memory = {d: max_memory for d in devices}
    if max_memory is not None and not isinstance(max_memory, dict):
        raise LoopscopeError(
            f"max_memory must be bytes, like '2GiB', or a dict, got {max_memory!r}"
        )
    if offload_folder is None:
        global _OFFLOAD_DIR
        if _OFFLOAD_DIR is None:
            _OFFLOAD_DIR = tempfile.TemporaryDirectory(prefix="loopscope-offload-")
        offload_folder = Path(_OFFLOAD_DIR.name) / path.resolve().name
    try:
        return cls.from_pretrained(
            path,
            local_files_only=True,
            use_safetensors=True,
            dtype=torch_dtype,
            device_map=device_map or "auto",
            max_memory=max_memory,
            offload_folder=str(offload_folder),
        )
    except (ValueError, KeyError) as e:  # accelerate's messages for bad maps / budgets
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoopscopeError(
            f"cannot place {path.name} with device_map={device_map!r}: {msg}"
        ) from None


class _PromoteFloat32(TorchFunctionMode):
    """Inside: ``.float()`` and every ``dtype=torch.float32`` request mean float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is Tensor.float:
            return args[0].double()
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


@contextmanager
def promote_float32():
    """Run HF code that hard-codes float32 casts in float64 (for a model cast with ``.double()``).

    Example:
        >>> import torch
        >>> with promote_float32():
        ...     torch.ones(2, dtype=torch.float64).float().dtype
        torch.float64
    """
    with _PromoteFloat32():
        yield


#: words of the stand-in tokenizer before the ``w<k>`` fillers (what the text tasks write)
_WORDS = [str(d) for d in range(10)] + list("+*=,:?;") + list("abcdefghijklmnopqrstuvwxyz")


def local_tokenizer(vocab_size: int):
    """An offline word-level tokenizer over ``vocab_size`` ids (a stand-in where the model's own
    tokenizer is not on disk): digits, ``+ * = , : ? ;``, ``a``-``z``, fillers ``w<k>``, then
    ``<pad> <bos> <eos> <unk>`` as the last four ids. Words are split on whitespace.

    Example:
        >>> tok = local_tokenizer(64)
        >>> tok("1 2 + 3 =", add_special_tokens=False)["input_ids"]
        [1, 2, 10, 3, 12]
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n = vocab_size - 4
    if n < 1:
        raise LoopscopeError(f"local_tokenizer needs vocab_size >= 5, got {vocab_size}")
    words = (_WORDS + [f"w{k}" for k in range(n)])[:n]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({"<pad>": n, "<bos>": n + 1, "<eos>": n + 2, "<unk>": n + 3})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    # save + reload: TransformerLens needs a real fast tokenizer and re-reads it from its folder
    # later (add_bos_token), so the folder lives as long as the process
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None:
        _TOKENIZER_DIR = tempfile.TemporaryDirectory(prefix="loopscope-tok-")
    folder = os.path.join(_TOKENIZER_DIR.name, str(vocab_size))
    tok.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)
