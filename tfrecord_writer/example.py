"""``tf.train.Example`` serialisation and TFRecord framing without TensorFlow.

Importing TensorFlow costs seconds and hundreds of MB per process; the preprocessing job
never does. The two formats are small and stable:

- Example (tensorflow/core/example/example.proto, feature.proto):
    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
                       Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }   Int64List { repeated int64 value = 1 [packed]; }
    FloatList { repeated float value = 1 [packed]; }  (little-endian IEEE float32)
- TFRecord: uint64 length (LE), uint32 masked CRC-32C of the length, data, uint32 masked
  CRC-32C of the data.

Map entries are written in sorted key order, so the bytes are deterministic.
tests/test_tfrecord_writer.py checks the output against TensorFlow's own parser.
"""

from __future__ import annotations

import struct

import google_crc32c

from tfrecord_writer.schema import FEATURES


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf encodes negative int64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _feature(kind: str, value) -> bytes:
    if kind == "bytes":
        if isinstance(value, str):
            value = value.encode("utf-8")
        return _field(1, _field(1, bytes(value)))  # Feature.bytes_list{value}
    if kind == "int64":
        packed = _varint(int(value))
        return _field(3, _field(1, packed))  # Feature.int64_list{packed value}
    if kind == "float":
        return _field(2, _field(1, struct.pack("<f", float(value))))  # Feature.float_list
    raise ValueError(f"unsupported feature kind {kind!r}")


def serialize_example(features: dict[str, bytes | str | int]) -> bytes:
    """Serialise a schema-conforming feature dict to ``tf.train.Example`` bytes."""
    unknown = set(features) - set(FEATURES)
    missing = set(FEATURES) - set(features)
    if unknown or missing:
        raise ValueError(f"features do not match the schema: unknown {sorted(unknown)}, "
                         f"missing {sorted(missing)}")
    entries = b"".join(
        _field(1, _field(1, key.encode()) + _field(2, _feature(FEATURES[key][0], features[key])))
        for key in sorted(features))
    return _field(1, entries)  # Example.features


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return n, i
        shift += 7


def _fields(buf: bytes):
    """(field number, payload) of each length-delimited or varint field in a message."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 2:
            n, i = _read_varint(buf, i)
            yield number, buf[i:i + n]
            i += n
        elif wire == 0:
            v, i = _read_varint(buf, i)
            yield number, v
        elif wire == 5:  # fixed32: an unpacked float
            yield number, struct.unpack("<f", buf[i:i + 4])[0]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def parse_example(data: bytes) -> dict[str, bytes | int | float]:
    """A ``tf.train.Example`` with single-valued bytes / int64 / float features (any Example
    this package writes, or TensorFlow's serialisation of it) back to {key: value}; floats
    come back as the float32 value stored, as a Python float."""
    out: dict[str, bytes | int | float] = {}
    for _, features in (f for f in _fields(data) if f[0] == 1):
        for _, entry in (f for f in _fields(features) if f[0] == 1):
            parts = dict(_fields(entry))
            key = parts[1].decode("utf-8")
            for kind, lst in _fields(parts.get(2, b"")):
                values = [v for n, v in _fields(lst) if n == 1]
                if kind == 3:  # int64_list, packed or not
                    ints = []
                    for v in values:
                        if isinstance(v, int):
                            ints.append(v)
                        else:
                            j = 0
                            while j < len(v):
                                x, j = _read_varint(v, j)
                                ints.append(x)
                    out[key] = ints[0] - (1 << 64) if ints[0] >= 1 << 63 else ints[0]
                elif kind == 1:
                    out[key] = values[0]
                elif kind == 2:  # float_list, packed or not
                    v = values[0]
                    out[key] = v if isinstance(v, float) else struct.unpack("<f", v[:4])[0]
    return out


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", _masked_crc(length)) + data
            + struct.pack("<I", _masked_crc(data)))


def read_records(path) -> list[bytes]:
    """Read back a TFRecord file, checking both CRCs (used by tests and by resume checks)."""
    return list(iter_records(path))


def iter_records(path):
    """The records of a TFRecord file one at a time, checking both CRCs."""
    with open(path, "rb") as f:
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ValueError(f"{path}: truncated record header")
            (n,), (crc,) = struct.unpack("<Q", head[:8]), struct.unpack("<I", head[8:])
            if _masked_crc(head[:8]) != crc:
                raise ValueError(f"{path}: bad length CRC")
            data, tail = f.read(n), f.read(4)
            if len(data) < n or len(tail) < 4:
                raise ValueError(f"{path}: truncated record")
            if _masked_crc(data) != struct.unpack("<I", tail)[0]:
                raise ValueError(f"{path}: bad data CRC")
            yield data
