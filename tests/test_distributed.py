"""LoFT on several processes: DDP and FSDP2 exact, DeepSpeed and FSDP1 refused, checkpoints move between set-ups.

The multi-process tests launch 2 processes on the CPU with the gloo backend, through ``accelerate launch
--config_file configs/accelerate_ddp.yaml`` with ``ACCELERATE_USE_CPU=true`` (the shipped config, run as a user runs
it, minus the GPUs). Plain loops come from ``scripts/ddp_equivalence.py``; the Trainer runs through ``loft-train``.
This file doubles as the launched worker for the Trainer and the refusal probes (``python -m tests.test_distributed``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import string
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from loft_peft import LoftConfig, create_loft_optimizer, distributed
from loft_peft.distributed import (
    FSDP_IGNORED_MODULES,
    average_gradients_across_processes,
    check_distributed_setup,
    check_factor_layout,
    keep_trainable_parameters_replicated,
    shard_frozen_base,
)

REPO = Path(__file__).resolve().parents[1]
DDP_CONFIG = REPO / "configs" / "accelerate_ddp.yaml"

# float64 tolerances, relative to each tensor's largest entry. From a fresh start the first two steps divide
# round-off by near-zero entries of the rebuilt second moment (Adam's first steps normalise every entry to about
# +-lr, however small its gradient), which turns the all-reduce's different order of additions (~1e-16) into
# up to ~1e-10 (measured: 7e-11); from a common checkpoint the runs agree to a few ulps (measured: 8e-16).
FRESH_TOLERANCE = 1e-8
RESUMED_TOLERANCE = 1e-12


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_env() -> dict[str, str]:
    # ACCELERATE_USE_CPU: the processes use gloo on the CPU; one thread each, as the machine has few cores.
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def _accelerate_launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG),
            "--num_processes", "2", "--main_process_port", str(_free_port()), *args]


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=env or _launch_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _equivalence_script():
    spec = importlib.util.spec_from_file_location("ddp_equivalence", REPO / "scripts" / "ddp_equivalence.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loft_model(**config):
    from peft import get_peft_model

    from .conftest import tiny_llama

    return get_peft_model(tiny_llama(), LoftConfig(r=4, **config))


def _state(kind: str, **fields):
    """A stand-in for accelerate's AcceleratorState: what the checks read from it."""
    from accelerate.utils import DistributedType

    return types.SimpleNamespace(distributed_type=DistributedType(kind), **fields)


def _fsdp2_state(**plugin):
    options = dict(fsdp_version=2, ignored_modules=None, cpu_ram_efficient_loading=False)
    options.update(plugin)
    return _state("FSDP", fsdp_plugin=types.SimpleNamespace(**options))


# ============================================================================================ refusals and checks
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_is_refused_for_every_zero_stage_naming_ddp_and_fsdp2(stage):
    state = _state("DEEPSPEED", deepspeed_plugin=types.SimpleNamespace(zero_stage=stage))
    with pytest.raises(ValueError, match=f"DeepSpeed ZeRO stage {stage}") as error:
        check_distributed_setup(state)
    assert "DDP" in str(error.value) and "FSDP2" in str(error.value)


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_is_refused_naming_fsdp2(use_orig_params):
    state = _state("FSDP", fsdp_plugin=types.SimpleNamespace(fsdp_version=1, use_orig_params=use_orig_params))
    with pytest.raises(ValueError, match="FSDP1.*fsdp_version: 2"):
        check_distributed_setup(state)


@pytest.mark.parametrize("kind", ["NO", "MULTI_CPU", "MULTI_GPU", "FSDP2"])
def test_single_process_ddp_and_fsdp2_setups_are_accepted(kind):
    check_distributed_setup(_fsdp2_state() if kind == "FSDP2" else _state(kind))


def test_create_loft_optimizer_refuses_a_deepspeed_run(monkeypatch):
    state = _state("DEEPSPEED", deepspeed_plugin=types.SimpleNamespace(zero_stage=2))
    monkeypatch.setattr(distributed, "_accelerate_state", lambda: state)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO stage 2"):
        create_loft_optimizer(_loft_model(), lr=1e-3)


def _one_step(model, optimizer):
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.clip_grad_norm_(1.0)
    optimizer.step()


def test_factor_group_regrouped_into_one_flat_buffer_is_refused_at_step():
    # What DeepSpeed ZeRO-1/2 does to the optimizer it wraps: each group's parameters become one flat partition.
    model = _loft_model()
    optimizer = create_loft_optimizer(model, lr=1e-3)
    _one_step(model, optimizer)
    group = next(g for g in optimizer.param_groups if g["loft"])
    group["params"] = [torch.nn.Parameter(torch.cat([p.detach().flatten() for p in group["params"]]))]
    with pytest.raises(ValueError, match="no longer holds 2-D .*DeepSpeed ZeRO and FSDP1.*DDP"):
        optimizer.step()


def test_factors_reshaped_in_place_into_1d_views_are_refused_at_clip_and_step():
    # What FSDP1 with use_orig_params=True does to the parameters an optimizer built before wrapping holds.
    model = _loft_model()
    optimizer = create_loft_optimizer(model, lr=1e-3)
    _one_step(model, optimizer)
    b_param = next(g for g in optimizer.param_groups if g["loft"])["params"][0]
    b_param.data = b_param.data.flatten()
    with pytest.raises(ValueError, match="no longer holds 2-D"):
        optimizer.clip_grad_norm_(1.0)
    with pytest.raises(ValueError, match="no longer holds 2-D"):
        optimizer.step()


def test_under_fsdp2_replicated_parameters_without_gradient_averaging_are_refused(monkeypatch):
    model = _loft_model()
    optimizer = create_loft_optimizer(model, lr=1e-3)
    monkeypatch.setattr(distributed, "_accelerate_state", lambda: _fsdp2_state())
    with pytest.raises(ValueError, match="average_gradients_across_processes"):
        check_factor_layout(optimizer)
    # What average_gradients_across_processes marks once it has hooked a parameter.
    for group in optimizer.param_groups:
        for p in group["params"]:
            setattr(p, distributed._AVERAGED, True)
    check_factor_layout(optimizer)


def test_fsdp_ignored_modules_pattern_selects_exactly_the_trainable_parameters():
    from accelerate.utils.fsdp_utils import get_parameters_from_modules

    model = _loft_model(modules_to_save=["lm_head"])
    ignored = get_parameters_from_modules(FSDP_IGNORED_MODULES, model, torch.device("cpu"))
    trainable = {p for p in model.parameters() if p.requires_grad}
    assert len(trainable) == 2 * 10 + 1  # q, k, v, up, down in 2 layers, and the lm_head copy
    assert ignored == trainable


def test_shipped_fsdp_config_gives_accelerate_an_fsdp2_plugin_that_keeps_the_trainable_parameters_whole(
        monkeypatch):
    # What `accelerate launch --config_file configs/accelerate_fsdp.yaml` turns the file into, without launching.
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import get_parameters_from_modules
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "configs" / "accelerate_fsdp.yaml"), "x"])
    for key, value in prepare_multi_gpu_env(_validate_launch_command(args)[0]).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    state = _state("FSDP", fsdp_plugin=plugin)
    check_distributed_setup(state)
    assert not keep_trainable_parameters_replicated(state)  # the config already chose, and chose right:
    model = _loft_model(modules_to_save=["lm_head"])
    ignored = get_parameters_from_modules(plugin.ignored_modules, model, torch.device("cpu"))
    assert ignored == {p for p in model.parameters() if p.requires_grad}


def test_loft_trainer_setup_keeps_factors_out_of_fsdp2_sharding_unless_the_config_chose():
    state = _fsdp2_state()
    assert keep_trainable_parameters_replicated(state)
    assert state.fsdp_plugin.ignored_modules == FSDP_IGNORED_MODULES
    chosen = _fsdp2_state(ignored_modules=".*lm_head")
    assert not keep_trainable_parameters_replicated(chosen)
    assert chosen.fsdp_plugin.ignored_modules == ".*lm_head"
    assert not keep_trainable_parameters_replicated(_state("MULTI_GPU"))
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading: false"):
        keep_trainable_parameters_replicated(_fsdp2_state(cpu_ram_efficient_loading=True))


def test_gradient_averaging_without_a_process_group_is_refused():
    with pytest.raises(ValueError, match="process group"):
        average_gradients_across_processes(_loft_model())


def test_shard_frozen_base_rejects_bad_input(toy_model):
    from peft import get_peft_model

    with pytest.raises(TypeError, match="ignored_params"):
        shard_frozen_base(_loft_model(), ignored_params=set())
    frozen = _loft_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        shard_frozen_base(frozen)
    with pytest.raises(ValueError, match="layer_classes"):
        shard_frozen_base(get_peft_model(toy_model, LoftConfig(r=2, target_modules=["proj"])))


# ================================================================= plain training loops on 2 processes (DDP, FSDP2)
@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory):
    """scripts/ddp_equivalence.py in float64: DDP and FSDP2 on 2 processes (one launch) against one process."""
    script = _equivalence_script()
    return script, script.compare(("ddp", "fsdp2"), "float64", workdir=tmp_path_factory.mktemp("equivalence"),
                                  port=_free_port())


@pytest.fixture(params=["ddp", "fsdp2"])
def launched(request, equivalence_runs):
    script, results = equivalence_runs
    return request.param, script, results[request.param]


def test_every_process_holds_bitwise_identical_factors_and_state_after_every_step(launched):
    _, _, results = launched
    assert len(results["ranks_identical"]) == 6 + 3  # the fresh run's 6 steps and the resumed run's 3
    assert [entry for entry in results["ranks_identical"] if entry[3] is not None] == []


def test_two_processes_equal_one_process_with_the_same_global_batch(launched):
    engine, script, results = launched
    norms = list(results["norms"].values())
    # The run exercises clipping: some steps are clipped and some are not.
    assert min(norms) < script.MAX_GRAD_NORM < max(norms)
    for step, difference in results["relative_difference"][f"{engine} vs single"].items():
        assert difference < FRESH_TOLERANCE, (step, difference)


def test_multi_process_checkpoint_resumes_in_one_process(launched):
    engine, _, results = launched
    for step, difference in results["relative_difference"][f"single resumed from {engine} vs {engine}"].items():
        assert difference < RESUMED_TOLERANCE, (step, difference)


def test_one_process_checkpoint_resumes_on_two_processes(launched):
    engine, _, results = launched
    for step, difference in results["relative_difference"][f"{engine} resumed from single vs single"].items():
        assert difference < RESUMED_TOLERANCE, (step, difference)


@pytest.mark.parametrize("launched", ["fsdp2"], indirect=True)
def test_fsdp2_shards_the_frozen_base_while_the_factors_stay_whole(launched):
    _, _, results = launched
    for layout in results["layout"]:
        assert layout["sharded"] and layout["local_rows"] == layout["rows"] // 2


# ====================================================================================== loft-train (the Trainer)
# 94 printable characters, the newline and <unk>: exactly tiny_llama's 96 token ids.
CHARACTERS = string.printable[:94] + "\n"


def _trainer_worker(dump_dir: Path, argv: list[str]) -> int:
    """Launched: ``loft-train`` (its ``main``), with a callback that saves every process's factors and state."""
    from transformers import TrainerCallback

    import loft_peft.train.cli as cli
    from loft_peft.trainer import unwrap_loft_optimizer

    class SaveEveryProcess(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            snapshot = {
                "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                "state": unwrap_loft_optimizer(optimizer).state_dict(),
                "world_size": args.world_size,
            }
            torch.save(snapshot, dump_dir / f"rank{args.process_index}_step{state.global_step}.pt")

    run = cli.run
    cli.run = lambda config, **kwargs: run(config, callbacks=(SaveEveryProcess(),), **kwargs)
    return cli.main(argv)


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """loft-train: 2 steps in one process, resumed to 4 on 2 processes (DDP), resumed to 6 in one process.

    The 2-process launch then runs the refusal probes (:func:`_refusal_worker`) in the same processes.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .conftest import tiny_llama

    root = tmp_path_factory.mktemp("trainer")
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARACTERS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text("".join(f"{i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60)))
    out, dumps = root / "run", root / "dumps"
    dumps.mkdir()
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "method": "loft", "rank": 4, "model_name_or_path": str(model_dir), "data_files": [str(text)],
        "block_size": 16, "learning_rate": 1e-2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4,
        "max_eval_examples": 4, "eval_on_start": False, "eval_steps": 100, "save_steps": 2, "logging_steps": 1,
        # Below every effective norm of this model (0.2-0.35), so the LoftCallback clips every step.
        "max_grad_norm": 0.05,
        "output_dir": str(out),
    }))
    cli = [sys.executable, "-m", "loft_peft.train", "--config", str(config)]
    single_env = {**_launch_env(), "CUDA_VISIBLE_DEVICES": ""}
    _run([*cli, "--max-steps", "2"], env=single_env)
    launched = _run(_accelerate_launch("-m", "tests.test_distributed", str(dumps), "--config", str(config), "--resume",
                                       "--max-steps", "4"))
    _run([*cli, "--resume", "--max-steps", "6"], env=single_env)
    return out, dumps, model_dir, launched.stdout


def _pair_step(optimizer_state: dict) -> int:
    """The step count of the first factor pair in a LoFT optimizer state_dict."""
    return int(optimizer_state["state"][0]["step"])


def test_trainer_on_two_processes_keeps_factors_and_state_identical_after_every_step(trainer_runs):
    _, dumps, _, stdout = trainer_runs
    first_difference = _equivalence_script().first_difference
    for step in (3, 4):
        ranks = [torch.load(dumps / f"rank{rank}_step{step}.pt", weights_only=True) for rank in (0, 1)]
        assert ranks[0]["world_size"] == 2
        assert first_difference(ranks[0]["params"], ranks[1]["params"]) is None
        assert first_difference(ranks[0]["state"], ranks[1]["state"]) is None
    assert "loft-train: wrote" in stdout


def test_trainer_checkpoint_from_one_process_resumes_on_two_processes(trainer_runs):
    out, dumps, _, _ = trainer_runs
    # The optimizer state continued from the one-process checkpoint at step 2 instead of starting over.
    assert _pair_step(torch.load(dumps / "rank0_step3.pt", weights_only=True)["state"]) == 3
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_trainer_checkpoint_from_two_processes_resumes_in_one_process(trainer_runs):
    out, dumps, model_dir, _ = trainer_runs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The adapter the two-process run saved is what both processes held.
    saved = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "checkpoint-4")
    held = torch.load(dumps / "rank0_step4.pt", weights_only=True)["params"]
    assert held and all(torch.equal(p, held[n]) for n, p in saved.named_parameters() if n in held)
    assert {n for n, _ in saved.named_parameters() if "loft_" in n} == set(held)
    # The one-process run continued the optimizer state of step 4 to step 6.
    assert _pair_step(torch.load(out / "checkpoint-6" / "optimizer.pt", weights_only=True)) == 6
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["world_size"] == 1


# ============================================================================== engines that flatten, for real
def _refusal_worker(out: Path) -> None:
    """Launched: FSDP2 sharding the factors, and FSDP1 flattening them, each stepped by a LoFT optimizer."""
    from accelerate import PartialState
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    state = PartialState(cpu=True)
    torch.set_num_threads(1)
    found = {}

    def attempt(name, model, optimizer):
        try:
            _one_step(model, optimizer)
            found[name] = ["no error", ""]
        except Exception as error:  # noqa: BLE001  (the test checks the type)
            found[name] = [type(error).__name__, str(error)]

    model = _loft_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    attempt("fsdp2 sharding the factors", model, create_loft_optimizer(model, lr=1e-3))
    model = _loft_model()
    optimizer = create_loft_optimizer(model, lr=1e-3)  # built before wrapping, as accelerate's plain loop does
    wrapped = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
    attempt("fsdp1 use_orig_params", wrapped, optimizer)
    if state.is_main_process:
        (out / "refusals.json").write_text(json.dumps(found))
    state.wait_for_everyone()


def test_real_fsdp2_sharded_factors_and_fsdp1_flat_views_are_refused(trainer_runs):
    # Probed by the processes of the 2-process loft-train run, after it (one launch for both).
    _, dumps, _, _ = trainer_runs
    found = json.loads((dumps / "refusals.json").read_text())
    kind, message = found["fsdp2 sharding the factors"]
    assert kind == "ValueError" and "sharded by FSDP2" in message and "fsdp_ignored_modules" in message
    kind, message = found["fsdp1 use_orig_params"]
    assert kind == "ValueError" and "no longer holds 2-D" in message and "FSDP2" in message


if __name__ == "__main__":
    # python -m tests.test_distributed DUMP_DIR LOFT_TRAIN_ARGS...: loft-train, then the refusal probes.
    code = _trainer_worker(Path(sys.argv[1]), sys.argv[2:])
    _refusal_worker(Path(sys.argv[1]))
    # Leaving with the process group alive can abort a process at exit (gloo's threads); end it as the command does.
    torch.distributed.destroy_process_group()
    sys.exit(code)
