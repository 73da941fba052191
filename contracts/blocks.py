"""Block transfer over MQTT, version 1 (docs/contracts/mqtt.md, "Block stream").

For devices without HTTP, the repositories' files (TUF metadata and packages) travel over
MQTT in fixed-size blocks. The device asks for the blocks it is missing; the control plane
answers each with one binary message. A device that loses its connection resumes by asking
only for the blocks its bitmap does not have.

Request (device -> cloud, ``edgeloop/v2/<fleet>/devices/<id>/blocks/req``, QoS 1), JSON::

    {"schema": "edgeloop.block-request/1", "request_id": "r1", "repo": "image",
     "path": "targets/m/1/<sha>.edge-gateway.elpkg", "blocks": [0, 1, 2], "block_size": 8192}

Block (cloud -> device, ``edgeloop/v2/<fleet>/devices/<id>/blocks``, QoS 1), binary: a 2-byte
big-endian header length, a JSON header, then the block's bytes::

    {"request_id": "r1", "path": "...", "index": 0, "total_size": 30720, "status": "ok"}

``status`` is ``ok``, ``not_found`` (the file does not exist: a device asking for the next root
version learns there is none) or ``refused`` (a bad request).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any

from edgeloop.contracts.errors import PayloadTooLarge, SchemaError

SCHEMA = "edgeloop.block-request/1"
DEFAULT_BLOCK_SIZE = 8192
MAX_BLOCK_SIZE = 64 * 1024
MAX_BLOCKS_PER_REQUEST = 64
REPOS = ("image", "director")
_PATH = re.compile(r"^(metadata|targets)/[A-Za-z0-9_.\-/]{1,512}$")

__all__ = ["BlockRequest", "Block", "encode_block", "decode_block", "DEFAULT_BLOCK_SIZE"]


@dataclass(frozen=True)
class BlockRequest:
    request_id: str
    repo: str
    path: str
    blocks: list[int]
    block_size: int = DEFAULT_BLOCK_SIZE

    def encode(self) -> bytes:
        return json.dumps({"schema": SCHEMA, "request_id": self.request_id, "repo": self.repo, "path": self.path,
                           "blocks": self.blocks, "block_size": self.block_size}).encode()

    @classmethod
    def decode(cls, payload: bytes) -> BlockRequest:
        if len(payload) > 16 * 1024:
            raise PayloadTooLarge("block request over 16 KiB")
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise SchemaError(f"block request is not JSON: {str(e)[:200]}") from None
        if not isinstance(obj, dict) or obj.get("schema") != SCHEMA:
            raise SchemaError("not an edgeloop.block-request/1")
        blocks, size, path = obj.get("blocks"), obj.get("block_size"), obj.get("path")
        if obj.get("repo") not in REPOS or not isinstance(path, str) or not _PATH.fullmatch(path) or ".." in path:
            raise SchemaError("block request names no valid repository file")
        if not isinstance(blocks, list) or not 0 < len(blocks) <= MAX_BLOCKS_PER_REQUEST \
                or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
            raise SchemaError(f"block request needs 1-{MAX_BLOCKS_PER_REQUEST} block indexes")
        if isinstance(size, bool) or not isinstance(size, int) or not 512 <= size <= MAX_BLOCK_SIZE:
            raise SchemaError("block_size out of bounds")
        if not isinstance(obj.get("request_id"), str) or len(obj["request_id"]) > 64:
            raise SchemaError("block request needs a request_id")
        return cls(obj["request_id"], obj["repo"], path, blocks, size)


@dataclass(frozen=True)
class Block:
    request_id: str
    path: str
    index: int
    total_size: int
    status: str
    data: bytes


def encode_block(block: Block) -> bytes:
    header = json.dumps({"request_id": block.request_id, "path": block.path, "index": block.index,
                         "total_size": block.total_size, "status": block.status}).encode()
    return struct.pack(">H", len(header)) + header + block.data


def decode_block(payload: bytes) -> Block:
    try:
        (size,) = struct.unpack(">H", payload[:2])
        header: dict[str, Any] = json.loads(payload[2:2 + size])
        return Block(str(header["request_id"]), str(header["path"]), int(header["index"]),
                     int(header["total_size"]), str(header["status"]), payload[2 + size:])
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, OverflowError,
            RecursionError) as e:   # OverflowError: int(1e400); RecursionError: a header nested too deep
        raise SchemaError(f"malformed block message: {str(e)[:200]}") from None
