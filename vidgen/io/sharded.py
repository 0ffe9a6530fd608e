"""Read FSDP-sharded (torch.distributed.checkpoint) and DeepSpeed ZeRO folders without unpickling arbitrary objects.

DCP's reader `pickle.load`s `.metadata` and its planner `torch.load(weights_only=False)`s non-tensor items;
DeepSpeed's `zero_to_fp32` and Lightning's converter load with `weights_only=False` too: a crafted folder runs
code. Here `.metadata` goes through an unpickler that builds only the classes DCP metadata is made of, and every
other payload through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import math
import pickle
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from vidgen.errors import UserError

META_FILE = "meta.pt"  # Lightning's FSDPStrategy: everything but weights and optimizer states
_REFUSED = "holds pickled objects that are not plain tensors/containers; refusing to unpickle it"


class UnsafeCheckpointError(UserError):
    """A checkpoint file that would need unpickling arbitrary objects (or reads outside its folder); refused."""


def _require(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: missing checkpoint file")
    return path


def _corrupt(name: Any, e: BaseException) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"{name}: truncated or corrupt checkpoint file ({first})")


def _load_plain(source: Any, name: Any, **kwargs: Any) -> Any:
    """torch.load(weights_only=True): objects beyond tensors/containers -> UnsafeCheckpointError, else UserError."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise UnsafeCheckpointError(f"{name}: {_REFUSED}") from None
        raise _corrupt(name, e) from None
    except Exception as e:  # truncated zip, bad magic, EOF, ...
        raise _corrupt(name, e) from None


# ----------------------------------------------------------------------------------------------- FSDP / DCP

# Everything a DCP `.metadata` pickles (one or many ranks, DTensor shards): its dataclasses, FileSystemWriter's
# storage info, torch.Size, dtypes, torch.layout (pickled as a name lookup) and the writer's path.
_METADATA_CLASSES: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed._shard.sharded_tensor.metadata": {"TensorProperties", "MEM_FORMAT_ENCODING"},  # torch < 2.2
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"} | {k for k, v in vars(torch).items() if isinstance(v, torch.dtype)},
}
# StorageMeta.checkpoint_id (the path the writer was given) is rebuilt as an inert pure path
_PATH_CLASSES = {"PosixPath": PurePosixPath, "PurePosixPath": PurePosixPath, "WindowsPath": PureWindowsPath,
                 "PureWindowsPath": PureWindowsPath}


class _MetadataUnpickler(pickle._Unpickler):  # the pure-Python unpickler, whose opcodes can be overridden
    """Unpickler that builds only the classes torch.distributed.checkpoint metadata is made of."""

    path: Path
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:
            return _PATH_CLASSES[name]
        if name in _METADATA_CLASSES.get(module, ()):
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpointError(f"{self.path}: pickles {module}.{name}, which DCP metadata never holds; "
                                    f"refusing to unpickle it")

    def load_build(self) -> None:  # set state only on fresh dataclass instances, never on a class or enum member
        if isinstance(self.stack[-2], type) or not dataclasses.is_dataclass(self.stack[-2]):
            raise UnsafeCheckpointError(f"{self.path}: sets the state of {type(self.stack[-2]).__name__}, which "
                                        f"DCP metadata never does; refusing to unpickle it")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _read_dcp_metadata(folder: Path) -> Any:
    """The folder's `.metadata` through the restricted unpickler, checked against the data files it names."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = _require(folder / ".metadata")
    try:
        with open(path, "rb") as f:
            unpickler = _MetadataUnpickler(f)
            unpickler.path = path
            metadata = unpickler.load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise _corrupt(path, e) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise UserError(f"{path}: not torch.distributed.checkpoint metadata")
    for info in metadata.storage_data.values():
        rel, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if not isinstance(rel, str) or rel in ("", ".", "..") or "/" in rel or "\\" in rel:
            raise UnsafeCheckpointError(f"{path}: names data file {rel!r} outside {folder}; refusing to read it")
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset <= offset + length):
            raise UserError(f"{path}: malformed storage info for {rel}")
        if offset + length > _require(folder / rel).stat().st_size:
            raise UserError(f"{folder / rel}: truncated (metadata expects {offset + length} bytes)")
    metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
    return metadata


def read_fsdp_folder(folder: str | Path) -> dict[str, Any]:
    """FSDP sharded (DCP) folder -> one checkpoint dict in Lightning's single-file layout, never unpickling code."""
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    from torch.futures import Future

    folder = Path(folder)
    metadata = _read_dcp_metadata(folder)

    class Reader(FileSystemReader):
        """FileSystemReader with the pre-checked metadata and weights_only loads of every tensor."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan: Any, planner: Any) -> Any:
            for req in plan.items:
                info = self.storage_data[req.storage_index]
                name = folder / info.relative_path
                with open(name, "rb") as f:
                    f.seek(info.offset)
                    stream: Any = io.BytesIO(f.read(info.length))
                if getattr(info, "transform_descriptors", None):  # e.g. zstd (torch >= 2.7 writers)
                    stream = io.BytesIO(self.transforms.transform_load_stream(
                        req, info.transform_descriptors, stream).read())
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, stream)
                    continue
                tensor = _load_plain(stream, name)
                if not isinstance(tensor, torch.Tensor):
                    raise UserError(f"{name}: tensor item {req.storage_index.fqn} holds {type(tensor).__name__}")
                tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
                planner.commit_tensor(req, planner.resolve_tensor(req).detach().copy_(tensor))
            done: Future = Future()
            done.set_result(None)
            return done

    class Planner(_EmptyStateDictLoadPlanner):
        """Rebuilds the state dict from the metadata; non-tensor items are loaded with weights_only=True."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            obj = _load_plain(value, folder / metadata.storage_data[read_item.storage_index].relative_path)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    sharded: dict[str, Any] = {}
    try:
        _load_state_dict(sharded, storage_reader=Reader(folder), planner=Planner(), no_dist=True)
    except CheckpointException as e:  # DCP wraps each step's errors in a BaseException: raise ours as they were
        errors = [exc for exc, _trace in e.failures.values()] or [e]
        ours = [exc for exc in errors if isinstance(exc, ValueError)]
        raise (ours[0] if ours else _corrupt(folder, errors[0])) from None
    meta = folder / META_FILE
    checkpoint = _load_plain(meta, meta) if meta.is_file() else {}
    weights = next((k for k in ("model", "state_dict") if k in sharded), None)  # FSDPStrategy / ModelParallelStrategy
    if not isinstance(checkpoint, dict) or weights is None:
        raise UserError(f"{folder}: not a Lightning FSDP checkpoint (no 'model' or 'state_dict' entry / {META_FILE} "
                        f"not a dict)")
    checkpoint["state_dict"] = sharded.pop(weights)
    checkpoint["optimizer_states"] = [sharded[k] for k in sorted(k for k in sharded if k.startswith("optimizer_"))]
    return checkpoint


# ---------------------------------------------------------------------------------------------- DeepSpeed


class _DeepSpeedRecord:
    """Inert attribute bag standing in for DeepSpeed's bookkeeping objects (loss scaler, fragment address)."""


# The only non-container types in ZeRO files (deepspeed 0.15-0.19), rebuilt as inert stand-ins (no deepspeed
# import): loss scalers and fragment addresses get their attributes set, ZeroStageEnum(2) becomes int(2).
_DS_GLOBALS = [(_DeepSpeedRecord, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
               (_DeepSpeedRecord, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
               (_DeepSpeedRecord, "deepspeed.utils.tensor_fragment.fragment_address"),
               (int, "deepspeed.runtime.zero.config.ZeroStageEnum")]
# DeepSpeed's own entries of a model-states file (as Lightning drops them); the rest is Lightning's client state
_DS_ENGINE_KEYS = {"module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps",
                   "global_steps", "dp_world_size", "mp_world_size"}


def _load_ds(path: Path, **kwargs: Any) -> Any:
    safe = getattr(torch.serialization, "safe_globals", None)  # torch < 2.5: nothing beyond the defaults
    with safe(_DS_GLOBALS) if safe else contextlib.nullcontext():
        return _load_plain(_require(path), path, **kwargs)


def _natural(paths: Any) -> list[Path]:
    return sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])


def _zero_fp32_weights(stage: int, world: int, flat: list[list[torch.Tensor]], models: list[dict]) -> dict:
    """The essence of DeepSpeed's zero_to_fp32: full fp32 parameters from per-rank flat fp32 partitions."""
    m0 = models[0]
    state = {k: v.float() for k, v in m0["module"].items() if k in set(m0["buffer_names"])}
    shapes, frozen = m0["param_shapes"], m0.get("frozen_param_shapes") or {}
    if stage <= 2:  # a param group's partitions concatenate to one flat vector of all its params
        state.update({name: m0["frozen_param_fragments"][name] for name in frozen})
        for g, group in enumerate(shapes):
            full, offset = torch.cat([rank[g] for rank in flat]), 0
            for name, shape in group.items():
                n = math.prod(shape)
                state[name] = full[offset:offset + n].view(shape).clone()
                offset += n
            align = 2 * world  # ZeRO-2 pads each group to a multiple of 2 * world size
            if math.ceil(offset / align) != math.ceil(full.numel() / align):
                raise ValueError(f"param group {g} has {full.numel()} fp32 values, its params need {offset}")
    else:  # every rank holds ceil(numel / world) values of each param, in param order, over all groups
        for name, shape in frozen.items():
            n = math.prod(shape)
            state[name] = torch.cat([m["frozen_param_fragments"][name] for m in models])[:n].view(shape).clone()
        ranks, offset = [torch.cat(list(rank)) for rank in flat], 0
        for name, shape in ((k, v) for group in shapes for k, v in group.items()):
            n, part = math.prod(shape), math.ceil(math.prod(shape) / world)
            state[name] = torch.cat([r[offset:offset + part] for r in ranks])[:n].view(shape).clone()
            offset += part
        if offset != ranks[0].numel():
            raise ValueError(f"each rank has {ranks[0].numel()} fp32 values, the params need {offset}")
    for alias, source in (m0.get("shared_params") or {}).items():
        if source in state:
            state[alias] = state[source]
    return state


def read_deepspeed_folder(folder: str | Path) -> dict[str, Any]:
    """DeepSpeed ZeRO-1/2/3 folder -> {"state_dict": full fp32 weights, **client state}, weights_only loads only."""
    folder = Path(folder)
    latest = _require(folder / "latest")
    tag = latest.read_text().strip()
    if tag in ("", ".", "..") or "/" in tag or "\\" in tag:
        raise UnsafeCheckpointError(f"{latest}: names {tag!r}, not a tag folder inside {folder}; refusing it")
    ckpt = folder / tag
    optim_files = _natural(ckpt.glob("*_optim_states.pt"))
    if not optim_files:
        raise UserError(f"{ckpt}: no *_optim_states.pt files (a ZeRO checkpoint folder named by {latest})")
    optims = []
    for path in optim_files:
        state = _load_ds(path, mmap=True)  # mmap: the (unused) Adam moments are never read into memory
        optims.append(state.get("optimizer_state_dict") if isinstance(state, dict) else None)
        if not isinstance(optims[-1], dict) or not {"zero_stage", "partition_count"} <= optims[-1].keys():
            raise UserError(f"{path}: not a DeepSpeed ZeRO optimizer-states file")
    stage, count = optims[0]["zero_stage"], optims[0]["partition_count"]  # ZeroStageEnum was loaded as an int
    world = max(count) if isinstance(count, (list, tuple)) else count  # ZeRO-2: one count per param group
    if stage not in (1, 2, 3) or world != len(optim_files):
        raise UserError(f"{ckpt}: ZeRO-{stage} over {world} ranks, but {len(optim_files)} optimizer-states files: "
                        f"{', '.join(p.name for p in optim_files)}")
    model_files = [ckpt / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)] if stage == 3 \
        else [ckpt / "mp_rank_00_model_states.pt"]  # as DeepSpeed names them
    models = [_load_ds(path) for path in model_files]
    for path, m in zip(model_files, models):
        if not isinstance(m, dict) or not {"module", "buffer_names", "param_shapes"} <= m.keys():
            raise UserError(f"{path}: not a DeepSpeed model-states file")
    key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
    try:
        weights = _zero_fp32_weights(stage, world, [list(osd[key]) for osd in optims], models)
    except (KeyError, TypeError, IndexError, RuntimeError, ValueError) as e:
        raise UserError(f"{ckpt}: malformed ZeRO-{stage} checkpoint ({(str(e).splitlines() or [''])[0]})") from None
    checkpoint = {k: v for k, v in models[0].items() if k not in _DS_ENGINE_KEYS}
    prefix = "_forward_module."  # Lightning < 2.1 wrapped the module
    checkpoint["state_dict"] = {k.removeprefix(prefix): v for k, v in weights.items()}
    return checkpoint


def check_sharded_folder(folder: str | Path) -> str:
    """Read a whole FSDP or DeepSpeed folder the safe way before a training strategy loads it its own way
    (DCP and DeepSpeed unpickle): anything but plain tensors/containers is refused. Returns "fsdp" | "deepspeed"."""
    folder = Path(folder)
    if (folder / ".metadata").is_file():
        read_fsdp_folder(folder)
        return "fsdp"
    if (folder / "latest").is_file():
        read_deepspeed_folder(folder)
        for path in _natural((folder / (folder / "latest").read_text().strip()).glob("*.pt")):
            _load_ds(path, mmap=True)  # every file DeepSpeed's loader will open, not only those we read
        return "deepspeed"
    raise UserError(f"{folder}: neither an FSDP sharded checkpoint (.metadata) nor a DeepSpeed checkpoint (latest)")
