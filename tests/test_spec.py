"""Job specs: what is accepted, and bad specs rejected with the field named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from poft_ds import REPO_ROOT
from poft_ds.ds_config import trainer_config
from poft_ds.launchers import free_port
from poft_ds.spec import SpecError, load_spec
from poft_ds.stages import is_staged, read_stages, stage_spec
from tests.conftest import base_spec, hub_cache, write_spec


def _load(spec: dict, tmp_path: Path):
    return load_spec(write_spec(spec, tmp_path / "job.yaml"))


def test_valid_spec_derives_roles_and_accumulation(assets: Path, tmp_path: Path) -> None:
    spec = _load(base_spec(assets, tmp_path / "r"), tmp_path)
    assert (spec.world_size, spec.trainer_ranks, spec.reference_ranks, spec.grad_accum_steps) == (4, 2, 2, 2)
    cfg = trainer_config(spec, "fp32")
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        8,
        2,
        2,
    )
    assert cfg["bf16"]["enabled"] is False and cfg["gradient_clipping"] == 1.0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s["topology"].update(procs_per_node=2), "topology.procs_per_node"),
        (
            lambda s: s.update(score_store={"enabled": False}, reference={"mode": "store"}),
            "reference.mode: 'store' trains from stored scores, but score_store.enabled is false",
        ),
        (
            lambda s: (s.update(score_store={"enabled": False}), s["data"].update(filter_min_quantile=0.5)),
            "data.filter_min_quantile: filters by stored scores, but score_store.enabled is false",
        ),
        (lambda s: s["training"].update(global_batch_size=10), "training.global_batch_size"),
        (lambda s: s["training"].update(gradient_accumulation_steps=3), "training.gradient_accumulation_steps"),
        (lambda s: s["training"].update(learning_rate="fast"), "training.learning_rate"),
        (lambda s: s["training"].update(micro_batch=2), "training.micro_batch"),
        (lambda s: s["objective"].update(kind="kto"), "objective.kind"),
        (lambda s: s.update(aligned_models=[]), "aligned_models"),
        (lambda s: s["model"].update(path="/nonexistent/model"), "model.path"),
        (lambda s: s["data"].update(train_files=["/nonexistent.jsonl"]), "data.train_files[0]"),
        (lambda s: s["aligned_models"][1].update(name="chatml"), "aligned_models"),
        (lambda s: s.pop("topology"), "topology"),
        (lambda s: s.pop("run_dir"), "run_dir"),
        (lambda s: s.update(optimizer={"type": "adamw"}), "optimizer"),
        (lambda s: s["objective"].update(beta=0), "objective.beta"),
        (lambda s: s["training"].update(micro_batch_size=0), "training.micro_batch_size"),
        (lambda s: s["data"].update(max_bad_fraction=1.5), "data.max_bad_fraction"),
        (lambda s: s["launcher"].update(kind="kubernetes"), "launcher.kind"),
        (lambda s: s["launcher"].update(kind="slurm", slurm={"time": "two days"}), "launcher.slurm.time"),
        (lambda s: s["topology"].update(nodes=2, procs_per_node=2), "launcher.kind"),
        (
            lambda s: s.update(
                topology={"nodes": 2, "procs_per_node": 3},
                launcher={"kind": "deepspeed", "deepspeed": {"hosts": ["a", "b", "c"]}},
            ),
            "launcher.deepspeed.hosts",
        ),
        (
            lambda s: (
                [s.update(topology={"nodes": 2, "procs_per_node": 3})]
                + [m.update(ranks=2) for m in s["aligned_models"]]
            ),
            "aligned_models[0].ranks",
        ),
        (lambda s: s["aligned_models"][0].update(trust_remote_code="yes please"), "aligned_models.0.trust_remote_code"),
        # Numbers: finite, and in the range the code that uses them accepts.
        (
            lambda s: s["training"].update(learning_rate=float("inf")),
            "training.learning_rate: Input should be a finite number",
        ),
        (lambda s: s["objective"].update(gamma=float("nan")), "objective.gamma: Input should be a finite number"),
        (lambda s: s.update(timeouts={"step_s": float("inf")}), "timeouts.step_s"),
        (
            lambda s: s["data"].update(train_files=[{"path": s["data"]["train_files"][0], "weight": float("nan")}]),
            "data.train_files.0",
        ),
        (lambda s: s["training"].update(adam_betas=[0.9, 1.0]), "training.adam_betas.1"),
        (lambda s: s["training"].update(adam_betas=[-0.1, 0.999]), "training.adam_betas.0"),
        (lambda s: s.update(seed=-1), "seed: Input should be greater than or equal to 0"),
        (lambda s: s.update(seed=2**64), "seed: Input should be less than"),
        (lambda s: s.update(run_dir=""), "run_dir"),
        (lambda s: s["model"].update(path=""), "model.path"),
        # SFT with aligned models would silently drop them.
        (lambda s: s["objective"].update(kind="sft"), "aligned_models: objective.kind 'sft' uses no aligned models"),
        # Absurd sizes are named as such, not as batch arithmetic.
        (
            lambda s: s["topology"].update(procs_per_node=100_000),
            "topology.procs_per_node: Input should be less than or equal to 1024",
        ),
        (lambda s: s["topology"].update(nodes=10_000), "topology.nodes: Input should be less than or equal to 4096"),
        # Files named by the spec.
        (
            lambda s: s["model"].update(chat_template="missing.jinja"),
            "model.chat_template: template file ... missing.jinja does not exist",
        ),
        (
            lambda s: s["aligned_models"][0].update(chat_template="templates/chatml"),
            "aligned_models[0].chat_template: ... does not exist",
        ),
        (lambda s: s["deepspeed"].update(train_config="nonexistent.json"), "deepspeed.train_config"),
        (
            lambda s: s.update(launcher={"kind": "deepspeed", "deepspeed": {"hostfile": "no_hosts"}}),
            "launcher.deepspeed.hostfile",
        ),
        # DeepSpeed configs are built at validation, as the ranks will build them.
        (
            lambda s: s["deepspeed"].update(overrides={"train_batch_size": 16}),
            "deepspeed.train_config: ... 'train_batch_size' is 16",
        ),
        (
            lambda s: s["deepspeed"].update(overrides={"gradient_accumulation_steps": 4}),
            "deepspeed.train_config: ... gradient_accumulation_steps",
        ),
        (
            lambda s: s["deepspeed"].update(overrides={"gradient_clipping": 0.5}),
            "deepspeed.train_config: ... training.max_grad_norm",
        ),
        (
            lambda s: s["deepspeed"].update(overrides={"zero_optimization": {"stage": 2}}),
            "deepspeed.train_config: ... stage must be 3",
        ),
        (
            lambda s: s["deepspeed"].update(overrides={"bf16": True}),
            "deepspeed.train_config: ... 'bf16' must be a JSON object",
        ),
        (
            lambda s: s["deepspeed"].update(
                overrides={"optimizer": {"type": "SGD"}, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
            ),
            "deepspeed.train_config: ... 'SGD' cannot run with offload_optimizer",
        ),
        (
            lambda s: s["deepspeed"].update(overrides={"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}),
            "deepspeed.train_config: ... needs an nvme_path",
        ),
        (
            lambda s: s["deepspeed"].update(overrides={"optimizer": {"type": "AdamW"}}),
            "deepspeed.train_config: ... would be ignored",
        ),
    ],
)
def test_invalid_specs_name_the_field(assets: Path, tmp_path: Path, change, field: str) -> None:
    spec = base_spec(assets, tmp_path / "r")
    change(spec)
    with pytest.raises(SpecError) as err:
        _load(spec, tmp_path)
    # `field` is the field path, then (after " ... ") what the message must also say.
    assert all(part in str(err.value) for part in field.split(" ... ")) and "job.yaml" in str(err.value)


def test_all_problems_are_reported_at_once(assets: Path, tmp_path: Path) -> None:
    spec = base_spec(assets, tmp_path / "r")
    spec["training"].update(learning_rate=-1, micro_batch_size="two")
    spec["objective"]["kind"] = "kto"
    spec["logging"] = {"every_step": 1}
    with pytest.raises(SpecError) as err:
        _load(spec, tmp_path)
    for field in ("training.learning_rate", "training.micro_batch_size", "objective.kind", "logging.every_step"):
        assert field in str(err.value)


def test_deepspeed_file_contradicting_the_spec_is_rejected_at_validation(assets: Path, tmp_path: Path) -> None:
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text()) | {"train_micro_batch_size_per_gpu": 4}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(SpecError, match=r"deepspeed.train_config: .*train_micro_batch_size_per_gpu.*micro_batch_size"):
        _load(base_spec(assets, tmp_path / "r", deepspeed={"train_config": "ds.json"}), tmp_path)


def _model_copy(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return str(dst)


def _ds_file(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            lambda s, tmp: s["deepspeed"].update(
                train_config=_ds_file(tmp, "ds.json", '{"zero_optimization": {"stage": 3,}}')
            ),
            "deepspeed.train_config: " + "{tmp}/ds.json: not valid JSON at line 1, column 35",
        ),
        (
            lambda s, tmp: s["deepspeed"].update(train_config=_ds_file(tmp, "ds.json", "[1, 2]")),
            "deepspeed.train_config",
        ),
        (
            lambda s, tmp: s["deepspeed"].update(train_config=_ds_file(tmp, "ds.json", '{"train_batch_size": "auto"}')),
            "deepspeed.train_config: {tmp}/ds.json: zero_optimization.stage must be 3",
        ),
        (
            lambda s, tmp: s["deepspeed"].update(
                reference_config=_ds_file(tmp, "ref.json", '{"zero_optimization": {"stage": 0}}')
            ),
            "deepspeed.reference_config",
        ),
        (
            lambda s, tmp: s["model"].update(
                path=_model_copy(Path(s["model"]["path"]), tmp / "m", drop=("tokenizer*",))
            ),
            "model.path: {tmp}/m has no tokenizer",
        ),
        (
            lambda s, tmp: (
                s["aligned_models"][1].update(path=_model_copy(Path(s["aligned_models"][1]["path"]), tmp / "m"))
                or (tmp / "m" / "config.json").write_text('{"model_type": "llama"\n"vocab_size": 3}')
            ),
            "aligned_models[1].path: {tmp}/m/config.json is not valid JSON at line 2",
        ),
        (lambda s, tmp: s["model"].update(chat_template=str(tmp)), "model.chat_template: {tmp} is a folder"),
        (lambda s, tmp: s["data"].update(train_files=[str(tmp)]), "data.train_files[0]: {tmp} is a folder"),
    ],
)
def test_invalid_files_name_the_field(assets: Path, tmp_path: Path, change, field: str) -> None:
    spec = base_spec(assets, tmp_path / "r")
    change(spec, tmp_path)
    with pytest.raises(SpecError) as err:
        _load(spec, tmp_path)
    assert field.format(tmp=tmp_path) in str(err.value)


def test_duplicated_yaml_key_is_named_with_its_line(assets: Path, tmp_path: Path) -> None:
    path = write_spec(base_spec(assets, tmp_path / "r"), tmp_path / "job.yaml")
    path.write_text(path.read_text() + "training:\n  learning_rate: 0.1\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    line = len(path.read_text().splitlines()) - 1
    assert "duplicate key 'training'" in str(err.value) and f'"{path}", line {line}' in str(err.value)


def test_chat_template_naming_a_file_of_any_extension_is_read(assets: Path, tmp_path: Path) -> None:
    template = (assets / "target" / "chat_template.jinja").read_text()
    (tmp_path / "chatml.txt").write_text(template)
    spec = base_spec(assets, tmp_path / "r")
    spec["model"]["chat_template"] = "chatml.txt"
    assert _load(spec, tmp_path).model.chat_template == template


def test_mistakes_in_every_stage_are_reported_in_one_run(assets: Path, tmp_path: Path) -> None:
    spec = base_spec(assets, tmp_path / "r")
    spec["training"]["learning_rate"] = "fast"  # a type error
    spec["aligned_models"][1]["name"] = "chatml"  # a cross-field rule
    spec["data"]["train_files"] = [str(tmp_path / "missing.jsonl")]  # a path
    spec["aligned_models"][0]["chat_template"] = "{% for m in messages %}{{ m.content }"  # a template
    proc = subprocess.run(
        [sys.executable, "-m", "poft_ds.cli", "validate", str(write_spec(spec, tmp_path / "job.yaml"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    for field in (
        "training.learning_rate:",
        "aligned_models: names must be unique",
        "data.train_files[0]:",
        "aligned_models[0].chat_template:",
    ):
        assert field in proc.stderr, proc.stderr


def test_env_interpolation_and_missing_variables(assets: Path, tmp_path: Path, monkeypatch) -> None:
    spec = base_spec(assets, tmp_path / "r")
    spec["model"]["path"] = "${POFT_TEST_MODEL}"
    monkeypatch.setenv("POFT_TEST_MODEL", str(assets / "target"))
    assert _load(spec, tmp_path).model.path == str(assets / "target")
    monkeypatch.delenv("POFT_TEST_MODEL")
    with pytest.raises(SpecError, match=r"model.path: environment variable POFT_TEST_MODEL is not set"):
        _load(spec, tmp_path)


def test_aligned_models_inherit_the_target_max_length_and_a_shorter_one_is_warned_about(
    assets: Path, tmp_path: Path
) -> None:
    spec = base_spec(assets, tmp_path / "r")
    spec["model"]["max_length"] = 128
    for m in spec["aligned_models"]:
        del m["max_length"]
    assert [m.max_length for m in _load(spec, tmp_path).aligned_models] == [128, 128]
    del spec["model"]["max_length"]
    loaded = _load(spec, tmp_path)
    assert loaded.model.max_length == 1024 and [m.max_length for m in loaded.aligned_models] == [1024, 1024]

    spec["model"]["max_length"] = 128
    spec["aligned_models"][1]["max_length"] = 64
    proc = subprocess.run(
        [sys.executable, "-m", "poft_ds.cli", "validate", str(write_spec(spec, tmp_path / "short.yaml"))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "aligned_models[1].max_length 64 < model.max_length 128" in proc.stderr
    assert "aligned_models[0]" not in proc.stderr


def test_examples_validate(assets: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_example")  # examples reference ${HF_TOKEN}
    specs = sorted((REPO_ROOT / "examples").rglob("*.yaml"))
    assert specs
    # Examples point at assets their build_assets.py creates (./assets, or ../../runs/bench-assets/<kind>);
    # the session's tiny assets stand in for them all.
    for kind in ("cpu", "gpu"):
        (tmp_path / "runs" / "bench-assets").mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / "bench-assets" / kind).symlink_to(assets)
    for path in specs:
        folder = tmp_path / "examples" / path.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "assets").exists():
            (folder / "assets").symlink_to(assets)
        copy = shutil.copy(path, folder / path.name)
        if is_staged(copy):  # every stage, the later ones checked against the first one's model
            stages, base = read_stages(copy)
            specs = [stage_spec(stage, base, str(copy))[0] for stage in stages]
            assert [s.objective.kind for s in specs] == ["poft", "dpo"] and specs[1].aligned_models[
                0
            ].name == "reference"
        else:
            specs = [load_spec(copy)]
        assert all(spec.trainer_ranks >= 1 for spec in specs)


def test_launcher_world_that_differs_from_the_spec_is_refused_by_every_rank(assets: Path, tmp_path: Path) -> None:
    path = write_spec(base_spec(assets, tmp_path / "r"), tmp_path / "job.yaml")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=3",
            f"--master-port={free_port()}",
            "-m",
            "poft_ds.cli",
            "train",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode != 0
    assert "launcher started 3 processes but the spec describes 4" in proc.stdout + proc.stderr


def test_hub_ids_resolve_offline_in_the_local_cache_and_a_missing_one_names_the_fix(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commits = hub_cache(
        cache,
        {"poft-test/tiny-target": assets / "target", "poft-test/zephyr": assets / "aligned_zephyr"},
        tags={"poft-test/zephyr": {"v1": assets / "aligned_chatml"}},
    )
    # What HF_HUB_CACHE / HF_HOME set when huggingface_hub is imported (the e2e job sets the variables).
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    spec = base_spec(assets, tmp_path / "run")
    spec["model"]["path"] = "poft-test/tiny-target"
    spec["aligned_models"][1].update(path="poft-test/zephyr", revision="v1")
    loaded = _load(spec, tmp_path)
    zephyr = Path(loaded.aligned_models[1].path)  # the folder the ranks load: the tag's commit, not main's
    assert zephyr == cache / "models--poft-test--zephyr" / "snapshots" / commits["poft-test/zephyr@v1"]
    assert (zephyr / "config.json").read_bytes() == (assets / "aligned_chatml" / "config.json").read_bytes()
    # The resolved spec names each hub model by its id and the commit its revision pointed to...
    resolved = loaded.public_dump()
    assert (resolved["model"]["path"], resolved["model"]["revision"]) == (
        "poft-test/tiny-target",
        commits["poft-test/tiny-target"],
    )
    assert (resolved["aligned_models"][1]["path"], resolved["aligned_models"][1]["revision"]) == (
        "poft-test/zephyr",
        commits["poft-test/zephyr@v1"],
    )
    assert resolved["aligned_models"][0]["path"] == str(assets / "aligned_chatml")
    # ...and loads again to the same folders.
    again = load_spec(write_spec(resolved, tmp_path / "resolved.yaml"))
    assert again.aligned_models[1].path == str(zephyr) and again.model.path == loaded.model.path

    # A model or revision missing from the cache: validate says how to fetch it (nothing is downloaded).
    spec["aligned_models"][0]["path"] = "poft-test/not-downloaded"
    spec["aligned_models"][1]["revision"] = "v2"
    with pytest.raises(SpecError) as bad:
        _load(spec, tmp_path)
    msg = str(bad.value)
    assert "aligned_models[0].path: 'poft-test/not-downloaded' is neither a local model directory" in msg
    assert "`hf download poft-test/not-downloaded`" in msg and str(cache) in msg
    assert "aligned_models[1].path: 'poft-test/zephyr'" in msg and "at revision 'v2'" in msg
    assert "`hf download poft-test/zephyr --revision v2`" in msg
    # A revision only means something for a hub id.
    local = base_spec(assets, tmp_path / "run")
    local["model"]["revision"] = "main"
    with pytest.raises(SpecError, match=r"model.revision: applies to hub ids;"):
        _load(local, tmp_path)


def test_dpo_defaults_its_reference_to_the_starting_weights_and_takes_one(assets: Path, tmp_path: Path) -> None:
    spec = base_spec(assets, tmp_path / "run", objective={"kind": "dpo"}, topology={"procs_per_node": 3})
    del spec["aligned_models"]
    spec["model"]["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    loaded = _load(spec, tmp_path)
    (ref,) = loaded.aligned_models
    assert (ref.name, ref.path, ref.max_length) == ("reference", str(assets / "target"), 96)
    assert ref.chat_template == loaded.model.chat_template  # the policy's own rendering
    assert loaded.objective.beta == 0.1 and loaded.trainer_ranks == 2  # TRL's beta; one rank serves the reference
    assert _load(base_spec(assets, tmp_path / "run"), tmp_path).objective.beta == 1.0  # PoFT's, the paper's

    two = base_spec(assets, tmp_path / "run", objective={"kind": "dpo"})
    with pytest.raises(SpecError, match=r"aligned_models: DPO has one reference model, got 2"):
        _load(two, tmp_path)
