"""Sharded checkpoint folders (FSDP/DCP, DeepSpeed ZeRO) are read back exactly, and crafted ones never run code."""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import pickle
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from vidgen.errors import UserError
from vidgen.io.sharded import UnsafeCheckpointError, read_deepspeed_folder, read_fsdp_folder

torch.set_num_threads(1)


class _Evil:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _dcp_save(state: dict, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... assuming a single process"
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True)


def _lightning_fsdp_state() -> tuple[dict, list]:
    g = torch.Generator().manual_seed(0)
    model = {"blocks.0.attn.weight": torch.randn(8, 4, generator=g), "blocks.0.attn.bias": torch.randn(8, generator=g),
             "norm.scale": torch.randn(4, generator=g).to(torch.bfloat16), "pos": torch.arange(6).view(2, 3)}
    trained = [k for k, v in model.items() if v.is_floating_point()]
    adam = {"state": {k: {"step": torch.tensor(7.0), "exp_avg": torch.randn(model[k].shape, generator=g),
                          "exp_avg_sq": torch.rand(model[k].shape, generator=g)} for k in trained},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False,
                              "foreach": None, "params": trained}]}
    sgd = {"state": {"pos": {"momentum_buffer": torch.randn(2, 3, generator=g)}},  # (DCP drops empty containers)
           "param_groups": [{"lr": 0.5, "momentum": 0.9, "nesterov": False, "params": ["pos"]}]}
    return model, [adam, sgd]


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_fsdp_folder_reads_back_exactly(tmp_path):
    model, optimizers = _lightning_fsdp_state()
    folder = tmp_path / "epoch=0-step=7.ckpt"
    _dcp_save({"model": model, **{f"optimizer_{i}": o for i, o in enumerate(optimizers)}}, folder)
    meta = {"epoch": 0, "global_step": 7, "vidgen": {"task": "dit"}, "loops": {"fit_loop": {"epoch_progress": {}}}}
    torch.save(meta, folder / "meta.pt")
    assert (folder / ".metadata").is_file() and list(folder.glob("*.distcp"))

    out = read_fsdp_folder(folder)
    assert out.keys() == {"epoch", "global_step", "vidgen", "loops", "state_dict", "optimizer_states"}
    _assert_same(out["state_dict"], model)
    _assert_same(out["optimizer_states"], optimizers)
    assert out["vidgen"] == {"task": "dit"} and out["global_step"] == 7


def _proves_live(payload_bytes: bytes, marker: Path, load) -> None:
    """The crafted payload really runs code with an unrestricted loader (so the refusal below means something)."""
    load(payload_bytes)
    assert marker.exists()
    marker.unlink()


def test_crafted_dcp_metadata_is_refused_without_running_it(tmp_path):
    folder = tmp_path / "sharded"
    _dcp_save({"model": {"w": torch.ones(2)}}, folder)
    marker = tmp_path / "MARKER"
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own, just written
    metadata.planner_data = {"x": _Evil(marker)}
    payload = pickle.dumps(metadata)
    _proves_live(payload, marker, pickle.loads)
    (folder / ".metadata").write_bytes(payload)

    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: pickles (posix|nt)\.system") as e:
        read_fsdp_folder(folder)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_crafted_dcp_metadata_cannot_alter_allowed_classes(tmp_path):
    """BUILD may only fill fresh metadata dataclasses: not patch a class or a shared enum member of torch."""
    folder = tmp_path / "sharded"
    _dcp_save({"model": {"w": torch.ones(2)}}, folder)
    enum_cls = b"\x80\x02ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n"
    key = b"X\x07\x00\x00\x00_value_K\x05s"  # {"_value_": 5}
    for payload in (enum_cls + b"K\x00\x85R}" + key + b"b.",  # _MEM_FORMAT_ENCODING(0).__dict__ |= {...}
                    enum_cls + b"N}" + key + b"\x86b."):  # setattr(_MEM_FORMAT_ENCODING, "_value_", 5)
        (folder / ".metadata").write_bytes(payload)
        with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: sets the state of"):
            read_fsdp_folder(folder)
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    assert _MEM_FORMAT_ENCODING(0)._value_ == 0 and "_value_" not in vars(_MEM_FORMAT_ENCODING)


def test_dcp_item_with_pickled_code_is_refused(tmp_path):
    """DCP's default planner torch.loads non-tensor items with weights_only=False; ours must not."""
    marker = tmp_path / "MARKER"
    folder = tmp_path / "sharded"
    _dcp_save({"model": {"w": torch.ones(2)}, "optimizer_0": {"param_groups": [{"lr": _Evil(marker)}]}}, folder)
    assert not marker.exists()
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    _proves_live(None, marker, lambda _: _load_state_dict(  # the stock reader + planner run it
        {}, storage_reader=dcp.FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True))
    with pytest.raises(UnsafeCheckpointError, match=r"__0_0\.distcp: holds pickled objects"):
        read_fsdp_folder(folder)
    assert not marker.exists()


def test_dcp_metadata_pointing_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "sharded"
    _dcp_save({"model": {"w": torch.ones(2)}}, folder)
    with open(folder / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    for info in metadata.storage_data.values():
        info.relative_path = "../secret.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        read_fsdp_folder(folder)


# ------------------------------------------------------------------------------------------------- DeepSpeed


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """DeepSpeed's own classes that its ZeRO files pickle, under their real module paths (deepspeed 0.15+)."""

    class ZeroStageEnum(int, enum.Enum):
        disabled, optimizer_states, gradients, weights = 0, 1, 2, 3

    class LossScaler:
        def __init__(self, scale=1):
            self.cur_scale, self.dynamic = scale, False

    class DynamicLossScaler(LossScaler):
        def __init__(self):
            super().__init__(2.0**16)
            self.cur_iter, self.last_overflow_iter, self.scale_factor, self.dynamic = 10, -1, 2.0, True
            self.dtype = torch.float16

    @dataclasses.dataclass
    class fragment_address:  # noqa: N801 - DeepSpeed's spelling
        numel: int
        start: int

    classes = {"deepspeed.runtime.zero.config": [ZeroStageEnum],
               "deepspeed.runtime.fp16.loss_scaler": [LossScaler, DynamicLossScaler],
               "deepspeed.utils.tensor_fragment": [fragment_address]}
    for name in ["deepspeed", "deepspeed.runtime", "deepspeed.runtime.zero", "deepspeed.runtime.fp16",
                 "deepspeed.utils", *classes]:
        module = types.ModuleType(name)
        for cls in classes.get(name, []):
            cls.__module__, cls.__qualname__ = name, cls.__name__
            setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(**{c.__name__: c for cs in classes.values() for c in cs})


def _rank_piece(v: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """ZeRO-3's partition of one param: ceil(numel / world) values per rank, the last rank zero padded."""
    part = math.ceil(v.numel() / world)
    return torch.nn.functional.pad(v.flatten(), (0, part * world - v.numel()))[rank * part:(rank + 1) * part].clone()


def _write_zero(folder: Path, stage: int, ds, trained: dict, buffers: dict, frozen: dict, groups, world=2) -> None:
    """Partition `trained` over ranks as DeepSpeed ZeRO-`stage` does; write the files as deepspeed 0.19 does.

    Key names, order, types and file names follow real ZeRO-2 (bf16) and ZeRO-3 (fp16) checkpoints written by
    deepspeed 0.19.8 through Lightning's DeepSpeedStrategy (client state merged into the model-states file).
    """
    tag = folder / "checkpoint"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    flat, paddings = [[] for _ in range(world)], []
    for g in groups:
        if stage == 2:  # a group's params flattened into one vector padded to 2*world, split evenly over ranks
            full = torch.cat([trained[n].flatten() for n in g])
            part = math.ceil(full.numel() / (2 * world)) * 2
            paddings.append(part * world - full.numel())  # saved "without padding": the last rank's is cut
            full = torch.nn.functional.pad(full, (0, paddings[-1]))
            for r in range(world):
                flat[r].append(full[r * part:(r + 1) * part].clone())
        else:  # every param split in ceil(n/world) pieces; a rank's flat group = its pieces in param order
            for r in range(world):
                flat[r].append(torch.cat([_rank_piece(trained[n], r, world) for n in g]))
    adam = lambda t: {"state": {0: {"step": torch.tensor(3.0), "exp_avg": t * 0, "exp_avg_sq": t * 0}},  # noqa: E731
                      "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                                        "amsgrad": False, "foreach": None, "fused": None, "params": [0]}]}
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
              "bf16" if stage == 2 else "fp16": {"enabled": True}, "gradient_clipping": 1.0}
    for r in range(world):
        if stage == 2:
            osd = {"loss_scaler": ds.LossScaler(1.0), "dynamic_loss_scale": False, "overflow": False,
                   "clip_grad": 1.0, "base_optimizer_state": adam(flat[r][0]),
                   "single_partition_of_fp32_groups": [f[:f.numel() - (p if r == world - 1 else 0)]
                                                       for f, p in zip(flat[r], paddings)],
                   "zero_stage": ds.ZeroStageEnum.gradients, "group_paddings": paddings if r == world - 1
                   else [0] * len(groups), "param_alignment_paddings": [[0] * len(g) for g in groups],
                   "partition_count": [world] * len(groups), "ds_version": "0.19.8",
                   "param_slice_mappings": [OrderedDict((n, ds.fragment_address(numel=trained[n].numel(), start=0))
                                                        for n in g) for g in groups]}
        else:
            osd = {"zero_stage": ds.ZeroStageEnum.weights, "loss_scaler": ds.DynamicLossScaler(),
                   "dynamic_loss_scale": True, "overflow": False, "partition_count": world,
                   "optimizer_state_dict": adam(flat[r][0]), "fp32_flat_groups": flat[r]}
        torch.save({"optimizer_state_dict": osd, "ds_config": config, "ds_version": "0.19.8"},
                   tag / f"{'bf16_' if stage == 2 else ''}zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    for r in range(world if stage == 3 else 1):
        low = {n: (v.to(torch.bfloat16) if stage == 2 else torch.empty(0, dtype=torch.float16))
               for n, v in {**trained, **frozen}.items()}
        fragments = frozen if stage == 2 else {n: _rank_piece(v, r, world) for n, v in frozen.items()}
        model = dict(module=OrderedDict({**buffers, **low}), buffer_names=list(buffers), optimizer=None,
                     param_shapes=[OrderedDict((n, trained[n].shape) for n in g) for g in groups],
                     frozen_param_shapes=OrderedDict((n, v.shape) for n, v in frozen.items()),
                     shared_params={"_forward_module.head.weight": "_forward_module.embed.weight"},
                     frozen_param_fragments=OrderedDict(fragments), lr_scheduler=None, data_sampler=None,
                     random_ltd=None, skipped_steps=0, global_steps=3, global_samples=12, dp_world_size=world,
                     mp_world_size=1, checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": 1},
                     ds_config=config, ds_version="0.19.8",
                     # Lightning's client state: its checkpoint minus "state_dict" and "optimizer_states"
                     epoch=1, global_step=3, **{"pytorch-lightning_version": "2.4.0"}, vidgen={"task": "dit"},
                     loops={"fit_loop": {"epoch_progress": {"total": {"ready": 1}}}}, callbacks={}, lr_schedulers=[])
        torch.save(model, tag / (f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" if stage == 3
                                 else "mp_rank_00_model_states.pt"))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_folder_gives_back_the_fp32_weights(tmp_path, fake_deepspeed, stage):
    g = torch.Generator().manual_seed(stage)
    trained = {"_forward_module.embed.weight": torch.randn(5, 3, generator=g),  # (prefix of Lightning < 2.1)
               "_forward_module.blocks.0.weight": torch.randn(3, 3, generator=g),
               "_forward_module.blocks.0.bias": torch.randn(3, generator=g),
               "_forward_module.out.weight": torch.randn(7, generator=g)}
    buffers = {"_forward_module.freqs": torch.arange(4, dtype=torch.float32)}
    frozen = {"_forward_module.text_proj": torch.randn(3, 3, generator=g).to(torch.bfloat16)}  # kept as trained
    groups = [list(trained)[:3], list(trained)[3:]]
    _write_zero(tmp_path, stage, fake_deepspeed, trained, buffers, frozen, groups)
    for name in list(sys.modules):  # DeepSpeed is never needed to read the folder
        if name.startswith("deepspeed"):
            del sys.modules[name]

    out = read_deepspeed_folder(tmp_path)
    expected = {k.removeprefix("_forward_module."): v for k, v in {**buffers, **frozen, **trained}.items()}
    expected["head.weight"] = expected["embed.weight"]  # DeepSpeed's shared_params
    sd = out["state_dict"]
    assert sd.keys() == expected.keys() and all(torch.equal(sd[k], v) for k, v in expected.items())
    assert out["global_step"] == 3 and out["vidgen"] == {"task": "dit"} and "module" not in out


@pytest.mark.parametrize("evil_in", ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_crafted_deepspeed_file_is_refused_without_running_it(tmp_path, fake_deepspeed, evil_in):
    _write_zero(tmp_path, 2, fake_deepspeed, {"w": torch.randn(4)}, {}, {}, [["w"]])
    marker = tmp_path / "MARKER"
    path = tmp_path / "checkpoint" / evil_in
    state = torch.load(path, weights_only=False)  # our own, just written
    state["hyper_parameters"] = {"lr": _Evil(marker)}
    torch.save(state, path)
    _proves_live(None, marker, lambda _: torch.load(path, weights_only=False))

    with pytest.raises(UnsafeCheckpointError, match=rf"{evil_in}: holds pickled objects .*refusing") as e:
        read_deepspeed_folder(tmp_path)
    assert "\n" not in str(e.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- missing / truncated


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("victim", [".metadata", "__0_0.distcp", "meta.pt"])
def test_truncated_or_missing_fsdp_file_names_it(tmp_path, victim):
    folder = tmp_path / "sharded"
    _dcp_save({"model": {"w": torch.randn(64, 64)}}, folder)
    torch.save({"epoch": 0}, folder / "meta.pt")
    _truncate(folder / victim)
    with pytest.raises(ValueError, match=rf"{victim}: (truncated|.*corrupt)") as e:
        read_fsdp_folder(folder)
    assert isinstance(e.value, UserError) and not isinstance(e.value, UnsafeCheckpointError)
    assert "\n" not in str(e.value)
    (folder / victim).unlink()
    if victim != "meta.pt":  # meta.pt is optional, as in Lightning
        with pytest.raises(ValueError, match=rf"{victim}: missing"):
            read_fsdp_folder(folder)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_truncated_or_missing_deepspeed_file_names_it(tmp_path, fake_deepspeed, victim):
    _write_zero(tmp_path, 2, fake_deepspeed, {"w": torch.randn(64)}, {}, {}, [["w"]])
    _truncate(tmp_path / "checkpoint" / victim)
    with pytest.raises(ValueError, match=rf"{victim}: truncated or corrupt") as e:
        read_deepspeed_folder(tmp_path)
    assert isinstance(e.value, UserError) and not isinstance(e.value, UnsafeCheckpointError)
    assert "\n" not in str(e.value)
    (tmp_path / "checkpoint" / victim).unlink()
    with pytest.raises(ValueError, match=rf"{victim}: missing" if "model" in victim else "over 2 ranks, but 1 optimizer"):
        read_deepspeed_folder(tmp_path)
    (tmp_path / "latest").unlink()
    with pytest.raises(ValueError, match="latest: missing"):
        read_deepspeed_folder(tmp_path)


# ------------------------------------------------------------------------ written by real multi-process runs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dtensor_save_worker(rank: int, folder: str, port: int) -> None:
    """Rank `rank` of 2 (gloo): save DTensor-sharded model + optimizer states with DCP, as FSDP2 does."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    model, optimizers = _lightning_fsdp_state()
    place = {"blocks.0.attn.weight": [Shard(0)], "blocks.0.attn.bias": [Shard(0)], "pos": [Shard(1)]}

    def dt(name: str, t: torch.Tensor):  # uneven too: "pos" has 3 columns over 2 ranks
        return distribute_tensor(t, mesh, place.get(name, [Replicate()]))

    adam = {"state": {k: {**v, "exp_avg": dt(k, v["exp_avg"]), "exp_avg_sq": dt(k, v["exp_avg_sq"])}
                      for k, v in optimizers[0]["state"].items()}, "param_groups": optimizers[0]["param_groups"]}
    state = {"model": {k: dt(k, v) for k, v in model.items()}, "optimizer_0": adam, "optimizer_1": optimizers[1]}
    dcp.save(state, checkpoint_id=folder)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_folder_sharded_over_two_processes_reads_back(tmp_path):
    folder = tmp_path / "sharded"
    torch.multiprocessing.spawn(_dtensor_save_worker, args=(str(folder), _free_port()), nprocs=2)
    assert sorted(p.name for p in folder.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    model, optimizers = _lightning_fsdp_state()
    out = read_fsdp_folder(folder)
    _assert_same(out["state_dict"], model)
    _assert_same(out["optimizer_states"], optimizers)


def _deepspeed_train_worker(rank: int, folder: str, port: int, stage: int) -> None:
    """Rank `rank` of 2: three bf16 ZeRO-`stage` steps on CPU (gloo), then DeepSpeed's own save_checkpoint."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed

    warnings.simplefilter("ignore")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5))
    net.register_buffer("freqs", torch.arange(4.0))
    net[1].requires_grad_(False)  # a frozen layer
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}}
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    for _ in range(3):
        engine.backward(engine(torch.randint(0, 11, (2, 3))).float().square().mean())
        engine.step()
    engine.save_checkpoint(folder, tag="checkpoint", client_state={"global_step": 3, "vidgen": {"task": "dit"}})


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_real_deepspeed_folder_matches_deepspeeds_own_converter(tmp_path, stage):
    pytest.importorskip("deepspeed")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    torch.multiprocessing.spawn(_deepspeed_train_worker, args=(str(tmp_path), _free_port(), stage), nprocs=2)
    expected = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path))  # unpickles with weights_only=False
    out = read_deepspeed_folder(tmp_path)
    assert out["global_step"] == 3 and out["vidgen"] == {"task": "dit"}
    _assert_same(out["state_dict"], dict(expected))
