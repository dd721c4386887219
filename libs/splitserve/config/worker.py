"""The config of a worker process (prefill, decode or colocated)."""
from __future__ import annotations

from dataclasses import dataclass

from splitserve.config.cpus import parse_cpu_list
from splitserve.config.engine import EngineConfig
from splitserve.rpc import check_mtls_files, mtls_credentials


@dataclass(frozen=True)
class WorkerConfig:
    host: str = "127.0.0.1"
    """Address to bind; internal roles stay on loopback unless told otherwise."""
    port: int = 50061
    """gRPC port (0 picks a free one)."""
    advertise_address: str = ""
    """host:port other processes use to reach this worker (default: host:port); its Redis owner id."""
    model: str = ""
    """GGUF file or HF checkpoint folder ("" = the default SmolLM2-135M-Instruct)."""
    dtype: str = "bfloat16"
    """Compute and KV-cache dtype (float32 or bfloat16 on the CPU)."""
    device: str = "cpu"
    """Torch device of the weights and the KV cache."""
    kv_cache_memory_gb: float = 1.0
    """KV cache budget in GiB."""
    block_size: int = 16
    """Tokens per KV block (must match every other role)."""
    max_num_seqs: int = 64
    """Most sequences in one engine step."""
    max_num_batched_tokens: int = 512
    """Token budget of one engine step."""
    enable_prefix_caching: bool = True
    """Reuse cached prompt blocks."""
    max_pending: int = 256
    """Most requests held at once; beyond it new ones are refused with RESOURCE_EXHAUSTED."""
    kvstore: str = ""
    """Address of the kvstore the blocks go through ("" = none: decode recomputes prompts)."""
    redis_url: str = ""
    """Redis that records block ownership ("" = none)."""
    ownership_ttl_s: float = 600.0
    """TTL of this worker's ownership entries (refreshed while the blocks stay cached)."""
    kv_lease_ttl_s: float = 60.0
    """How long the kvstore pins a request's blocks for the decode worker."""
    tls_ca_file: str = ""
    """Mutual TLS between roles: the PEM CA that signed every role's certificate (with tls_cert_file
    and tls_key_file; all three or none). The gRPC server then requires client certificates and
    this process's own calls present its certificate."""
    tls_cert_file: str = ""
    """Mutual TLS: this process's PEM certificate (its SANs must name the address others dial)."""
    tls_key_file: str = ""
    """Mutual TLS: the PEM private key of tls_cert_file."""
    max_message_bytes: int = 64 << 20
    """Largest gRPC message accepted or sent."""
    grpc_threads: int = 64
    """gRPC handler threads (each open stream holds one)."""
    torch_threads: int = 0
    """CPU threads for the model (0 = one per core of `cpus`, else torch's default: all cores).
    Workers sharing cores should run with a short OpenMP spin (GOMP_SPINCOUNT=10000, as `splitserve
    up` sets), or libgomp's default spin keeps idle threads busy on them for milliseconds."""
    cpus: str = ""
    """Cores this worker runs on, in the cpu-list format of taskset ('0', '2-3', '0,4-7'; '' = all).
    Pinning prefill and decode workers to different cores keeps a long prefill from delaying the
    running decodes' next tokens."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint (0 picks a free one, logged; -1 turns it off)."""
    metrics_host: str = ""
    """Address the /metrics endpoint binds ("" = the same as host)."""

    def __post_init__(self) -> None:
        check_mtls_files(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if self.cpus:
            parse_cpu_list(self.cpus)  # a bad list fails here, naming the cores
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], or -1 for no metrics endpoint, "
                             f"got {self.metrics_port}")

    def channel_credentials(self):
        """Credentials for this worker's own calls (to the kvstore): mutual TLS, or None."""
        return mtls_credentials(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)[1]

    def engine_config(self) -> EngineConfig:
        return EngineConfig.from_kwargs(
            model=self.model or None, dtype=self.dtype, device=self.device,
            kv_cache_memory_gb=self.kv_cache_memory_gb, block_size=self.block_size,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
        )
