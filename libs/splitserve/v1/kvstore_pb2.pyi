from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockChunk(_message.Message):
    __slots__ = ("block_hash", "header", "data", "last", "lease_id", "lease_ttl_s", "missing")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    header: bytes
    data: bytes
    last: bool
    lease_id: str
    lease_ttl_s: float
    missing: bool
    def __init__(self, block_hash: _Optional[bytes] = ..., header: _Optional[bytes] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., lease_id: _Optional[str] = ..., lease_ttl_s: _Optional[float] = ..., missing: _Optional[bool] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("num_stored", "num_already_present", "num_bytes")
    NUM_STORED_FIELD_NUMBER: _ClassVar[int]
    NUM_ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    num_stored: int
    num_already_present: int
    num_bytes: int
    def __init__(self, num_stored: _Optional[int] = ..., num_already_present: _Optional[int] = ..., num_bytes: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("block_hashes", "release_lease_id")
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    RELEASE_LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    release_lease_id: str
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ..., release_lease_id: _Optional[str] = ...) -> None: ...

class ContainsRequest(_message.Message):
    __slots__ = ("block_hashes",)
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ContainsResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("num_released",)
    NUM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    num_released: int
    def __init__(self, num_released: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("num_blocks", "used_bytes", "capacity_bytes", "num_leases", "num_pinned_blocks", "num_evictions", "bytes_in", "bytes_out")
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_LEASES_FIELD_NUMBER: _ClassVar[int]
    NUM_PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    num_blocks: int
    used_bytes: int
    capacity_bytes: int
    num_leases: int
    num_pinned_blocks: int
    num_evictions: int
    bytes_in: int
    bytes_out: int
    def __init__(self, num_blocks: _Optional[int] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., num_leases: _Optional[int] = ..., num_pinned_blocks: _Optional[int] = ..., num_evictions: _Optional[int] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("shm_dir", "shm_probe", "shm_token")
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    SHM_PROBE_FIELD_NUMBER: _ClassVar[int]
    SHM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    shm_dir: str
    shm_probe: str
    shm_token: bytes
    def __init__(self, shm_dir: _Optional[str] = ..., shm_probe: _Optional[str] = ..., shm_token: _Optional[bytes] = ...) -> None: ...

class ReserveSlotsRequest(_message.Message):
    __slots__ = ("payload_size", "num_slots")
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    payload_size: int
    num_slots: int
    def __init__(self, payload_size: _Optional[int] = ..., num_slots: _Optional[int] = ...) -> None: ...

class ReserveSlotsResponse(_message.Message):
    __slots__ = ("reservation_id", "arena", "slot_stride", "slots", "ttl_s")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ARENA_FIELD_NUMBER: _ClassVar[int]
    SLOT_STRIDE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    arena: str
    slot_stride: int
    slots: _containers.RepeatedScalarFieldContainer[int]
    ttl_s: float
    def __init__(self, reservation_id: _Optional[str] = ..., arena: _Optional[str] = ..., slot_stride: _Optional[int] = ..., slots: _Optional[_Iterable[int]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class SlotBlock(_message.Message):
    __slots__ = ("block_hash", "header", "slot")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    header: bytes
    slot: int
    def __init__(self, block_hash: _Optional[bytes] = ..., header: _Optional[bytes] = ..., slot: _Optional[int] = ...) -> None: ...

class CommitSlotsRequest(_message.Message):
    __slots__ = ("reservation_id", "blocks", "lease_id", "lease_ttl_s")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    blocks: _containers.RepeatedCompositeFieldContainer[SlotBlock]
    lease_id: str
    lease_ttl_s: float
    def __init__(self, reservation_id: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[SlotBlock, _Mapping]]] = ..., lease_id: _Optional[str] = ..., lease_ttl_s: _Optional[float] = ...) -> None: ...

class ArenaBlock(_message.Message):
    __slots__ = ("block_hash", "header", "arena", "offset")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ARENA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    header: bytes
    arena: str
    offset: int
    def __init__(self, block_hash: _Optional[bytes] = ..., header: _Optional[bytes] = ..., arena: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class GetSlotsResponse(_message.Message):
    __slots__ = ("blocks", "read_lease_id", "rest_by_stream")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    READ_LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REST_BY_STREAM_FIELD_NUMBER: _ClassVar[int]
    blocks: _containers.RepeatedCompositeFieldContainer[ArenaBlock]
    read_lease_id: str
    rest_by_stream: bool
    def __init__(self, blocks: _Optional[_Iterable[_Union[ArenaBlock, _Mapping]]] = ..., read_lease_id: _Optional[str] = ..., rest_by_stream: _Optional[bool] = ...) -> None: ...
