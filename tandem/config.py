"""Engine configuration: plain dataclasses, validated on construction."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "ki": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "mi": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "gi": 2**30,
          "t": 10**12, "tb": 10**12, "tib": 2**40, "ti": 2**40}


def parse_size(value: int | str) -> int:
    """'4GiB', '512M', '1e9' or an int -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"kv_cache_memory: cannot parse size {value!r} (try '2GiB' or '512MiB')")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


KV_ROLES = ("prefill", "decode", "both")
KV_FAILURE_POLICIES = ("fail", "recompute")
KV_TRANSPORTS = ("auto", "tcp")  # auto: shared memory between workers on one host, else TCP


@dataclass
class KVTransferConfig:
    """Disaggregated prefill/decode (tandem/kv_transfer): which halves run and how they meet."""

    role: str = "both"  # which sides run: prefill (sender), decode (receiver) or both
    host: str = "127.0.0.1"  # the sender binds here; decode workers connect to it
    port: int = 0  # 0: pick a free port
    secret: bytes = b""
    lease_s: float = 10.0  # a handed-out prefill's blocks live this long without a heartbeat
    transfer_timeout_s: float = 10.0  # a pull with no progress for this long fails ("timeout")
    failure_policy: str = "fail"  # fail: the request errors; recompute: decode prefills locally
    transport: str = "auto"
    # heartbeats stop extending a lease this long after it was issued: a decode worker too busy to
    # pull for minutes must not hold the prefill worker's blocks for ever (its pull then fails
    # lease_expired, and the failure policy decides)
    max_hold_s: float = 120.0

    def __post_init__(self) -> None:
        if self.role not in KV_ROLES:
            raise ValueError(f"kv role must be one of {KV_ROLES}, got {self.role!r}")
        if self.failure_policy not in KV_FAILURE_POLICIES:
            raise ValueError(f"kv failure policy must be one of {KV_FAILURE_POLICIES}, got {self.failure_policy!r}")
        if self.transport not in KV_TRANSPORTS:
            raise ValueError(f"kv transport must be one of {KV_TRANSPORTS}, got {self.transport!r}")
        if len(self.secret) < 16:
            raise ValueError("the KV transfer secret must be at least 16 bytes ($TANDEM_KV_TRANSFER_SECRET)")
        if self.lease_s <= 0 or self.transfer_timeout_s <= 0 or self.max_hold_s <= 0:
            raise ValueError("lease_s, transfer_timeout_s and max_hold_s must be positive")

    @property
    def sends(self) -> bool:
        return self.role in ("prefill", "both")

    @property
    def receives(self) -> bool:
        return self.role in ("decode", "both")


KV_OFFLOADING_BACKENDS = ("native",)


@dataclass
class KVOffloadConfig:
    """KV offloading (tandem/kv_offload): a host tier of ``host_bytes`` and an optional disk tier."""

    host_bytes: int
    backend: str = "native"
    disk_path: str | None = None  # a directory; blocks survive a restart there
    disk_bytes: int = 0

    def __post_init__(self) -> None:
        if self.backend not in KV_OFFLOADING_BACKENDS:
            raise ValueError(f"kv_offloading_backend must be one of {KV_OFFLOADING_BACKENDS}, got {self.backend!r}")
        if self.host_bytes <= 0:
            raise ValueError("kv_offloading_size must be > 0 GiB")
        if self.disk_path is not None and self.disk_bytes <= 0:
            raise ValueError("kv_disk_size must be > 0 GiB with kv_disk_path")


SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle", "eagle3")  # vLLM also has mtp: not built here yet
_NOT_YET = ("mtp", "medusa", "mlp_speculator")
_NEEDS_MODEL = ("draft_model", "eagle", "eagle3")
_NGRAM_KEYS = ("prompt_lookup_min", "prompt_lookup_max")


@dataclass
class SpeculativeConfig:
    """vLLM's ``speculative_config`` (tandem/spec_decode). ``adaptive`` (tandem's own key): the
    number of draft tokens per request and step is chosen from the measured acceptance and step
    cost, down to none (off: always ``num_speculative_tokens`` where a proposal exists).
    ``model``: the draft model's directory (method draft_model; it shares the target's tokenizer) or
    the EAGLE head's (method eagle; trained for the target, tandem/model/eagle.py)."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    adaptive: bool = True
    model: str | None = None

    def __post_init__(self) -> None:
        if self.method in _NOT_YET:
            raise ValueError(f"speculative_config method {self.method!r} is not supported yet; available: "
                             f"{', '.join(SPECULATIVE_METHODS)}")
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_config method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                             f"got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min}, {self.prompt_lookup_max}")
        if self.method in _NEEDS_MODEL and not self.model:
            raise ValueError(f"speculative_config method {self.method!r} needs model (the "
                             f"{'draft model' if self.method == 'draft_model' else 'EAGLE head'}'s directory)")
        if self.method == "ngram" and self.model is not None:
            raise ValueError("speculative_config model applies to methods 'draft_model', 'eagle' and 'eagle3', "
                             "not 'ngram'")

    @classmethod
    def from_dict(cls, raw: dict) -> SpeculativeConfig:
        """A user's dict: unknown keys are an error that names them (nothing is silently ignored)."""
        if raw.get("method") in _NOT_YET:
            raise ValueError(f"speculative_config method {raw['method']!r} is not supported yet; available: "
                             f"{', '.join(SPECULATIVE_METHODS)}")
        known = {"method", "num_speculative_tokens", *_NGRAM_KEYS, "adaptive", "model"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"speculative_config: unsupported key(s) {', '.join(unknown)}; "
                             f"supported: {', '.join(sorted(known))}")
        if raw.get("method", cls.method) != "ngram" and (given := [k for k in _NGRAM_KEYS if k in raw]):
            raise ValueError(f"speculative_config {', '.join(given)} apply to method 'ngram' only")
        if "model" in raw and not isinstance(raw["model"], str):
            raise ValueError(f"speculative_config model must be a directory path, got {raw['model']!r}")
        values = dict(raw)
        if "prompt_lookup_max" in values and "prompt_lookup_min" not in values:
            values["prompt_lookup_min"] = min(cls.prompt_lookup_min, values["prompt_lookup_max"])
        if "prompt_lookup_min" in values and "prompt_lookup_max" not in values:
            values["prompt_lookup_max"] = max(cls.prompt_lookup_max, values["prompt_lookup_min"])
        for key in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool)):
                raise ValueError(f"speculative_config {key} must be an integer, got {values[key]!r}")
        return cls(**values)


# vLLM's names: auto = the model's dtype; fp8 = fp8_e4m3 (tandem/kernels/kv_quant.py)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    # CPU: bytes of KV cache (default 2 GiB). GPU: fraction of device memory for weights + cache.
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None  # exact block count, mostly for tests
    cache_dtype: str = "auto"  # vLLM's kv_cache_dtype: auto, fp8 (= fp8_e4m3), fp8_e5m2
    calculate_kv_scales: bool = False  # FP8: per-layer scales from the first batch instead of the checkpoint's
    kv_cache_dtype_skip_layers: list[int] = field(default_factory=list)  # layers that keep the model's dtype

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if any(i < 0 for i in self.kv_cache_dtype_skip_layers):
            raise ValueError(f"kv_cache_dtype_skip_layers must be layer indices >= 0, "
                             f"got {self.kv_cache_dtype_skip_layers}")
        if self.kv_cache_memory is not None:
            self.kv_cache_memory = parse_size(self.kv_cache_memory)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # one token budget per step, shared by decodes and prefill chunks
    max_num_seqs: int = 256
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" or "priority" (lower value first, as in vLLM)
    # schedule and launch step N+1 before reading step N's sampled ids (they reach the device
    # inputs directly); outputs arrive one step later. Pays on a GPU; on a CPU it only delays.
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass
class ModelConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"  # auto: float32 on CPU, the config's half type (else bfloat16) on GPU
    max_model_len: int | None = None
    seed: int = 0
    device: str = "auto"
    load_format: str = "auto"  # auto: safetensors; dummy: random weights of config.json (benchmarks)
    enforce_eager: bool = False  # True: no CUDA graphs
    # decode batch sizes replayed from CUDA graphs (default on CUDA: 1, 2, 4, 8, 16, 32, ... up to
    # max_num_seqs, at most 256); on a CPU only when given, and then run eagerly (tests the padding)
    cuda_graph_sizes: list[int] | None = None
    attention_backend: str = "auto"  # auto: Triton on a CUDA GPU, the C++ decode kernel on a CPU, else torch
    cpu_gemm: str = "auto"  # fp32 linear layers on a CPU: auto (measured at load), blas, onednn
    quantization: str | None = None  # online weight quantization of every linear layer but the LM head
    precision_policy: str | None = None  # a YAML file of per-layer schemes (tandem/quantization/policy.py)
    cpu_offload_gb: float = 0.0  # GiB of decoder-layer weights kept in host memory (CUDA; runner/weight_offload.py)


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_transfer: KVTransferConfig | None = None  # disaggregated prefill/decode (tandem/kv_transfer)
    kv_offload: KVOffloadConfig | None = None  # host and disk KV tiers (tandem/kv_offload)
    speculative: SpeculativeConfig | None = None  # speculative decoding (tandem/spec_decode)
