"""Tests for :mod:`mmrl.config_checks` and the tasks' ``validate``: a config is checked completely — every
range, name and path — before any model loads, with every problem in one error; unknown keys point to the
right key, in any section, also for names brought from TRL / EasyR1 / verl."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import image_gen.task  # noqa: F401  (both tasks' rewards registered before any test filters the registry)
import mmrl.rewards
import vision.task  # noqa: F401
from mmrl.config import ConfigError, load_config, load_yaml
from mmrl.config_checks import config_problems, looks_local, validate_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted([*REPO.glob("configs/vision/*.yaml"), *REPO.glob("configs/image_gen/*.yaml")])
VISION_DEMO = REPO / "configs/vision/demo.yaml"
IMAGE_GEN_DEMO = REPO / "configs/image_gen/demo.yaml"
TASK_MODULES = {"vision": "vision.task", "image_gen": "image_gen.task"}  # as mmrl.cli.TASKS
# Configs that need local copies of official checkpoints (their header comments say so): the files they name.
NEEDS_LOCAL_FILES = {
    "llamagen_c2i_xl_384.yaml": {"model.gpt": "checkpoints/c2i_XL_384.pt",
                                 "model.vq": "checkpoints/vq_ds16_c2i.pt",
                                 "data.class_names": "path/to/imagenet_classes.txt"},
    "llamagen_t2i_xl_256.yaml": {"model.gpt": "checkpoints/t2i_XL_stage1_256.pt",
                                 "model.vq": "checkpoints/vq_ds16_t2i.pt",
                                 "data.prompt_file": "path/to/train_prompts.txt"},
}


def load(path: Path, overrides: list[str] | tuple[str, ...] = ()):
    """(config, task module) as mmrl.cli._load builds them: the task (from the file or a task= override)
    types the task sections."""
    task_name = load_yaml(path).get("task", "vision")
    for item in overrides:
        if item.startswith("task="):
            task_name = item.partition("=")[2]
    module = importlib.import_module(TASK_MODULES[task_name])
    return load_config(path, list(overrides), section_types=module.SECTION_TYPES), module


def problems(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    cfg, module = load(path, overrides)
    return config_problems(cfg, module.validate)


def error_of(path: Path, overrides: list[str] | tuple[str, ...] = ()) -> str:
    cfg, module = load(path, overrides)
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, task_checks=module.validate)
    return str(info.value)


def only_own_rewards(monkeypatch, task_name: str) -> None:
    """The reward registry as a CLI run of ``task_name`` has it: this test process imported both tasks."""
    other = {"vision": "image_gen", "image_gen": "vision"}[task_name]
    for name in ("_REGISTRY", "_FACTORIES"):
        registry = getattr(mmrl.rewards, name)
        kept = {k: v for k, v in registry.items() if not getattr(v, "__module__", "").startswith(other)}
        monkeypatch.setattr(mmrl.rewards, name, kept)


@pytest.fixture(autouse=True)
def _in_empty_dir(tmp_path, monkeypatch):
    # Relative paths in configs resolve against an empty working directory: results do not depend on
    # what happens to lie around the repository.
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------------------------------
# Shipped configs
# --------------------------------------------------------------------------------------------------


def test_every_shipped_config_is_found():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "compare_tiny.yaml", "papo_grpo_tiny.yaml", "janus_pro_1b.yaml", "describe_scene_tiny.yaml",
            "describe_scene_tiny_precision_only.yaml", *NEEDS_LOCAL_FILES} <= names
    assert len(SHIPPED) == 18


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_validates_clean(path, monkeypatch):
    only_own_rewards(monkeypatch, path.parent.name)
    missing = NEEDS_LOCAL_FILES.get(path.name, {})
    found = problems(path)
    # Without the local checkpoints, exactly the files it names are reported, each naming its key.
    assert [line.split("=", 1)[0] for line in found] == list(missing)
    for line, file in zip(found, missing.values()):
        assert f"{file!r}: does not exist (no such file" in line
    for file in missing.values():  # with them present, it validates clean
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        Path(file).write_text("")
    assert problems(path) == []


def test_validation_loads_no_model(monkeypatch):
    import vision.modeling
    import vision.task

    def refuse(*args, **kwargs):
        raise AssertionError("validation must not load a model")

    monkeypatch.setattr(vision.modeling, "load_model_and_processor", refuse)
    monkeypatch.setattr(vision.task, "load_model_and_processor", refuse)
    monkeypatch.setattr(vision.task, "run_sft", refuse)
    cfg, module = load(VISION_DEMO)
    validate_config(cfg, task_checks=module.validate)


# --------------------------------------------------------------------------------------------------
# Bad values: each one named, with its value and what is allowed
# --------------------------------------------------------------------------------------------------

BAD_VALUES = [
    # the ones from the issue
    ("optim.lr=-1e-5", "optim.lr=-1e-05: must be > 0"),
    ("group_size=1", "group_size=1: must be >= 2 (group-relative advantages need at least 2 completions"),
    ("algorithm.loss_type=ppo",
     "algorithm.loss_type='ppo': must be one of ['grpo', 'bnpo', 'dapo', 'dr_grpo']"),
    ("rewards=[{name: acuracy}]", "rewards[0].name='acuracy': must be one of ['accuracy', "),
    ("logging.report_to=[jsonl, tensorbord]",
     "logging.report_to[1]='tensorbord': must be one of ['jsonl', 'tensorboard', 'wandb', 'none']; "
     "did you mean 'tensorboard'?"),
    ("sampling.top_p=1.5", "sampling.top_p=1.5: must be in (0, 1]"),
    ("sampling.temperature=-1", "sampling.temperature=-1.0: must be > 0"),
    ("sampling.temperature=0", "every completion of a prompt is the same, every advantage is 0"),
    ("papo.gamma=-0.5", "papo.gamma=-0.5: must be >= 0"),
    ("model.name_or_path=./no/such/model",
     "model.name_or_path='./no/such/model': does not exist (no such directory"),
    ("model.name_or_path=/no/such/model",
     "model.name_or_path='/no/such/model': does not exist (no such directory"),
    ("data.train=./no/such/train.jsonl",
     "data.train='./no/such/train.jsonl': does not exist (no such file or directory"),
    ("data.eval=data/held_out.parquet",
     "data.eval='data/held_out.parquet': does not exist (no such file or directory"),
    # the other ranges and names
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]=1.0: must be in [0, 1)"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0: must be >= 0 (0 turns gradient clipping off)"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5: must be >= 0"),
    ("optim.scheduler=cosine_annealing",
     "optim.scheduler='cosine_annealing': must be one of ['linear', 'cosine'"),
    ("optim.scheduler=reduce_lr_on_plateau", "needs scheduler arguments the trainer does not pass"),
    ("optim.lr=.nan", "optim.lr=nan: must be a finite number > 0"),
    ("max_steps=0", "max_steps=0: must be >= 1"),
    ("prompts_per_step=0", "prompts_per_step=0: must be >= 1"),
    ("micro_batch_size=0", "micro_batch_size=0: must be >= 1"),
    ("mini_batch_size=48",
     "mini_batch_size=48: must divide the rollout of prompts_per_step * group_size = 64 samples"),
    ("mini_batch_size=128", "mini_batch_size=128: must divide the rollout"),  # larger than the rollout
    ("logprob_chunk_size=0", "logprob_chunk_size=0: must be >= 1"),
    ("save_steps=-1", "save_steps=-1: must be >= 0"),
    ("save_total_limit=0", "save_total_limit=0: must be >= 1 or null (null keeps every checkpoint)"),
    ("max_consecutive_skips=0", "max_consecutive_skips=0: must be >= 1"),
    ("reward_timeout=0", "reward_timeout=0.0: must be > 0 or null (seconds; null = no limit)"),
    ("mixed_precision=fp8", "mixed_precision='fp8': must be one of ['auto', 'no', 'bf16', 'fp16']"),
    ("seed=-1", "seed=-1: must be in [0, 4294967295]"),
    ("resume_from=./runs/none", "resume_from='./runs/none': does not exist (no such directory"),
    ("sampling.top_k=-1", "sampling.top_k=-1: must be >= 0 (0 disables top-k)"),
    ("sampling.max_new_tokens=0", "sampling.max_new_tokens=0: must be >= 1"),
    ("algorithm.adv_scale=std", "algorithm.adv_scale='std': must be one of ['group', 'batch', 'none']"),
    ("algorithm.epsilon=0", "algorithm.epsilon=0.0: must be in (0, 1)"),
    ("algorithm.epsilon_high=-0.2", "algorithm.epsilon_high=-0.2: must be > 0 or null"),
    ("algorithm.beta=-0.01", "algorithm.beta=-0.01: must be >= 0"),
    ("algorithm.kl_estimator=k4", "algorithm.kl_estimator='k4': must be one of ['k1', 'k2', 'k3']"),
    ("algorithm.ppo_epochs=0", "algorithm.ppo_epochs=0: must be >= 1"),
    ("algorithm.kl_in_reward=true", "algorithm.kl_in_reward=True: needs algorithm.beta > 0"),
    ("algorithm.ref_sync_steps=10", "algorithm.ref_sync_steps=10: refreshes the KL reference: needs algorithm.beta > 0"),
    ("algorithm.ref_sync_alpha=0", "algorithm.ref_sync_alpha=0.0: must be in (0, 1]"),
    ("filters.max_sample_batches=0", "filters.max_sample_batches=0: must be >= 1"),
    ("filters.top_entropy_fraction=1.5", "filters.top_entropy_fraction=1.5: must be in (0, 1] or null"),
    ("papo.gamma_schedule=cosine", "papo.gamma_schedule='cosine': must be one of ['constant', 'linear']"),
    ("papo.anneal_fraction=0", "papo.anneal_fraction=0.0: must be in (0, 1]"),
    ("papo.kl_estimator=kl", "papo.kl_estimator='kl': must be one of ['k1', 'k2', 'k3']"),
    ("papo.kl_token_clip=0", "papo.kl_token_clip=0.0: must be > 0 or null"),
    ("papo.eta_orig=-0.03", "papo.eta_orig=-0.03: must be >= 0"),
    ("papo.monitor_window=0", "papo.monitor_window=0: must be >= 1"),
    ("eval.every_steps=-1", "eval.every_steps=-1: must be >= 0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens=0: must be >= 1 or null"),
    ("eval.temperature=-0.5", "eval.temperature=-0.5: must be >= 0"),
    ("eval.batch_size=0", "eval.batch_size=0: must be >= 1"),
    ("eval.reward=acc", "eval.reward='acc': must be one of ["),
    ("logging.log_completions=-1", "logging.log_completions=-1: must be >= 0"),
    ("rewards=[{name: accuracy, weight: .inf}]", "rewards[0].weight=inf: must be a finite number"),
    ("rewards=[{name: accuracy, weight: 0}]", "every weight is 0"),
    ("rewards=[]", "rewards=[]: must list at least one reward function"),
    ("rewards=[{name: ./no_such_reward.py:score}]",
     "rewards[0].name='./no_such_reward.py': does not exist (no such file"),
    # task sections (vision)
    ("model.dtype=fp32", "model.dtype='fp32': must be one of ['auto', 'float32', 'bfloat16', 'float16']"),
    ("model.min_pixels=20000", "model.min_pixels=20000: must be <= model.max_pixels=12544"),
    ("model.max_pixels=0", "model.max_pixels=0: must be >= 1"),
    ("data.train=synthetic:single_shapes", "data.train='synthetic:single_shapes': unknown synthetic task"),
    ("data.synthetic_options={max_count: 3, colour: red}", "unknown option(s) ['colour', 'max_count']"),
    ("data.eval_split=validation", "data.eval_split='validation': must be one of ['train', 'test']"),
    ("data.eval=benchmark:mathvist", "data.eval='benchmark:mathvist': must be one of ["),
    ("data.train=benchmark:mathvista",
     "data.train='benchmark:mathvista': 'benchmark:NAME' is for data.eval only"),
    ("data.layout=verl", "data.layout='verl': must be one of ['auto', 'easyr1', 'trl']"),
    ("data.template=think", "data.template='think': unknown prompt template 'think'"),
    ("data.image_dir=./images", "data.image_dir='./images': does not exist (no such directory"),
    ("data.max_prompt_length=0", "data.max_prompt_length=0: must be >= 1 or null"),
    ("data.max_train_samples=0", "data.max_train_samples=0: must be >= 1 or null"),
    ("cold_start.steps=-1", "cold_start.steps=-1: must be >= 0 (0 = no cold start)"),
    ("cold_start.lr=0", "cold_start.lr=0.0: must be > 0"),
    ("cold_start.answer_format=xml",
     "cold_start.answer_format='xml': must be one of ['answer', 'r1', 'boxed'"),
]


@pytest.mark.parametrize("override, expected", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_named(override, expected):
    message = error_of(VISION_DEMO, [override])
    assert expected in message
    assert message.startswith("invalid config (1 problem):\n  - ")


IMAGE_GEN_BAD = [
    ("model.backend=diffusion", "model.backend='diffusion': must be one of ['llamagen', 'janus']"),
    ("model.gpt=./no/such/gpt.pt", "model.gpt='./no/such/gpt.pt': does not exist (no such file or directory"),
    ("model.vq=no/such/vq_dir", "model.vq='no/such/vq_dir': does not exist (no such file or directory"),
    ("model.gpt_config=GPT-XXL-plus", "model.gpt_config='GPT-XXL-plus': must be one of ["),
    ("model.image_size=250", "model.image_size=250: must be a multiple of 16"),
    ("model.cfg_scale=-2", "model.cfg_scale=-2.0: must be >= 0"),
    ("model.cfg_interval=[0.8, 0.2]", "model.cfg_interval=[0.8, 0.2]: must be [start, end] with 0 <= start"),
    ("model.logprob_mode=guided", "model.logprob_mode='guided': must be one of ['cond', 'cfg']"),
    ("model.text_encoder=./t5", "model.text_encoder='./t5': does not exist (no such directory"),
    ("data.prompts=procedural", "data.prompts='procedural': needs a text-conditional (t2i) model"),
    ("data.prompts=files",
     "data.prompts='files': must be one of ['classes', 'file', 'procedural', 'tiny_shapes']"),
    ("data.prompts=file", "data.prompt_file=None: must be a path"),
    ("data.categories=[colors]", "data.categories[0]='colors': must be one of ["),
    ("data.num_train=0", "data.num_train=0: must be >= 1"),
    ("data.num_eval=-1", "data.num_eval=-1: must be >= 0"),
    ("data.class_ids=[3, -1]", "data.class_ids[1]=-1: must be >= 0"),
    ("papo.enabled=true", "papo.enabled=True: needs a task with a `masking` section"),
    ("rewards=[{name: vlm_judge}]", "rewards[0].args={}: reward 'vlm_judge' takes (model"),
    ("rewards=[{name: vlm_judge}]", "(missing a required argument: 'model')"),
    ("rewards=[{name: clip_score, args: {model: ./clip}}]",
     "rewards[0].args.model='./clip': does not exist (no such file or directory"),
    ("rewards=[{name: clip_score, args: {modle: x}}]", "got an unexpected keyword argument 'modle'"),
    ("eval.reward=vlm_judge", "eval.reward='vlm_judge': reward 'vlm_judge' takes (model"),
    ("eval.reward=vlm_judge", "list it under rewards (weight 0 is fine) with its args"),
]


@pytest.mark.parametrize("override, expected", IMAGE_GEN_BAD, ids=[b[0] for b in IMAGE_GEN_BAD])
def test_image_gen_bad_value_is_named(override, expected):
    assert expected in error_of(IMAGE_GEN_DEMO, [override])


def test_rewards_of_the_other_task_are_unknown(monkeypatch):
    # image_gen does not import the vision rewards: eval.reward's default ('accuracy') is no reward there
    only_own_rewards(monkeypatch, "image_gen")
    message = error_of(IMAGE_GEN_DEMO, ["eval.reward=accuracy"])
    assert "eval.reward='accuracy': must be one of [" in message
    assert "'geneval_rules'" in message


def test_masking_out_of_range_is_a_config_error_at_load():
    with pytest.raises(ConfigError, match=re.escape("masking: prob must be a number in [0, 1], got 1.5")):
        load(VISION_DEMO, ["masking.prob=1.5"])


def test_all_problems_are_listed_at_once():
    overrides = ["optim.lr=-1e-5", "group_size=1", "algorithm.loss_type=ppo", "rewards=[{name: acuracy}]",
                 "logging.report_to=[jsonl, tensorbord]", "sampling.top_p=1.5", "sampling.temperature=-1",
                 "papo.gamma=-0.5", "model.name_or_path=./no/such/model", "data.train=./no/such/train.jsonl"]
    message = error_of(VISION_DEMO, overrides)
    lines = message.splitlines()
    assert lines[0] == "invalid config (10 problems):"
    keys = [line.removeprefix("  - ").split("=", 1)[0] for line in lines[1:]]
    assert sorted(keys) == sorted(["optim.lr", "group_size", "algorithm.loss_type", "rewards[0].name",
                                   "logging.report_to[1]", "sampling.top_p", "sampling.temperature",
                                   "papo.gamma", "model.name_or_path", "data.train"])


# --------------------------------------------------------------------------------------------------
# Paths: local ones must exist, hub ids are left alone
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-VL-3B-Instruct", "hiyouga/geometry3k",
                                  "openai/clip-vit-base-patch32", "deepseek-community/Janus-Pro-1B"])
def test_hub_ids_do_not_look_local(name):
    assert not looks_local(name)


@pytest.mark.parametrize("name", ["./model", "../model", "/abs/model", "~/model", "checkpoints/c2i_XL_384.pt",
                                  "data/train.jsonl", "a/b/c", "prompts.txt"])
def test_local_paths_look_local(name):
    assert looks_local(name)


def test_hub_ids_are_not_flagged():
    assert problems(VISION_DEMO, ["model.name_or_path=Qwen/Qwen2.5-VL-3B-Instruct",
                                  "data.train=hiyouga/geometry3k", "data.eval=hiyouga/geometry3k"]) == []
    clip = "rewards=[{name: clip_score, args: {model: openai/clip-vit-base-patch32}}]"
    assert problems(IMAGE_GEN_DEMO, [clip]) == []


def test_existing_local_paths_pass(tmp_path):
    model = tmp_path / "my_model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "images").mkdir()
    assert problems(VISION_DEMO, [f"model.name_or_path={model}", "data.train=./train.jsonl",
                                  "data.image_dir=images"]) == []


def test_model_directory_without_config_json(tmp_path):
    (tmp_path / "weights").mkdir()
    assert "the directory has no config.json" in error_of(VISION_DEMO, ["model.name_or_path=./weights"])


def test_reward_file_is_checked_but_not_run(tmp_path):
    (tmp_path / "my_reward.py").write_text("raise SystemExit('validation must not import this file')\n")
    assert problems(VISION_DEMO, ["rewards=[{name: ./my_reward.py:score}]", "eval.reward=accuracy"]) == []


def test_reward_file_needs_a_function_name(tmp_path):
    (tmp_path / "rewards.py").write_text("")
    message = error_of(VISION_DEMO, ["rewards=[{name: 'rewards.py:not-a-name'}]"])
    assert "rewards[0].name='rewards.py:not-a-name': 'not-a-name' is not a function name" in message


def test_eval_reward_may_be_a_configured_file_reward(tmp_path):
    (tmp_path / "my_reward.py").write_text("")
    overrides = ["rewards=[{name: my_reward.py:score}]", "eval.reward=my_reward.py:score"]
    assert problems(VISION_DEMO, overrides) == []
    message = error_of(VISION_DEMO, ["eval.reward=gone.py:score"])
    assert "eval.reward='gone.py': does not exist (no such file" in message


# --------------------------------------------------------------------------------------------------
# Unknown keys: the nearest key in any section, and names from TRL / EasyR1 / verl
# --------------------------------------------------------------------------------------------------

ALIASES = [
    ("learning_rate=1e-5", "unknown config key 'learning_rate' — TRL's learning_rate is `optim.lr` here"),
    ("num_generations=4", "TRL's num_generations is `group_size` here"),
    ("max_completion_length=512", "TRL's max_completion_length is `sampling.max_new_tokens` here"),
    ("beta=0.04", "TRL's beta is `algorithm.beta` here"),
    ("epsilon=0.2", "TRL's epsilon is `algorithm.epsilon` here"),
    ("epsilon_high=0.28", "TRL's epsilon_high is `algorithm.epsilon_high` here"),
    ("max_grad_norm=1.0", "TRL's max_grad_norm is `optim.max_grad_norm` here"),
    ("weight_decay=0.01", "TRL's weight_decay is `optim.weight_decay` here"),
    ("warmup_steps=10", "TRL's warmup_steps is `optim.warmup_steps` here"),
    ("lr_scheduler_type=cosine", "TRL's lr_scheduler_type is `optim.scheduler` here"),
    ("per_device_train_batch_size=8", "TRL's per_device_train_batch_size is `prompts_per_step` here (counts "
                                      "completions (prompts x num_generations) per device"),
    ("rollout_batch_size=512", "EasyR1's rollout_batch_size is `prompts_per_step` here (counts prompts over "
                               "all GPUs; prompts_per_step counts them per process)"),
    ("temperature=0.9", "TRL's temperature is `sampling.temperature` here"),
    ("top_p=0.99", "TRL's top_p is `sampling.top_p` here"),
    ("top_k=50", "TRL's top_k is `sampling.top_k` here"),
    ("loss_type=dapo", "TRL's loss_type is `algorithm.loss_type` here"),
    ("num_iterations=2", "TRL's num_iterations is `algorithm.ppo_epochs` here"),
    ("ppo_epochs=2", "EasyR1/verl's ppo_epochs is `algorithm.ppo_epochs` here"),
    ("report_to=[wandb]", "TRL's report_to is `logging.report_to` here"),
    ("max_prompt_length=1024", "TRL's max_prompt_length is `data.max_prompt_length` here"),
    ("kl_coef=0.01", "EasyR1/verl's kl_coef is `algorithm.beta` here"),
    ("algorithm.kl_coef=0.01",
     "unknown config key 'algorithm.kl_coef' — EasyR1/verl's kl_coef is `algorithm.beta`"),
    ("kl_loss_coef=0.01", "verl's kl_loss_coef is `algorithm.beta` here"),
    ("n=5", "EasyR1/verl's n is `group_size` here"),
    ("rollout.n=5", "unknown config key 'rollout' — EasyR1/verl's rollout.n is `group_size` here"),
    ("worker.rollout.n=5", "EasyR1/verl's rollout.n is `group_size` here"),
    ("worker.actor.optim.lr=1e-6", "worker.actor.optim.lr is `optim.lr` here"),
    ("optim.seed=1", "unknown config key 'optim.seed' — TRL's seed is `seed` here (a top-level key)"),
    ("sampling.save_total_limit=2", "TRL's save_total_limit is `save_total_limit` here"),
    ("optim.gradient_checkpointing=true", "TRL's gradient_checkpointing is `gradient_checkpointing` here"),
    ("logging_steps=10", "TRL's logging_steps has no counterpart here (every optimizer step is logged"),
    ("eval.top_p=0.9", "is `sampling.top_p` here"),
    # no foreign name: the nearest key anywhere
    ("lr=1e-5", "unknown config key 'lr'. Did you mean 'optim.lr' (or 'cold_start.lr')?"),
    ("temprature=0.7", "unknown config key 'temprature'. Did you mean 'sampling.temperature' (or "
                       "'eval.temperature')?"),
    ("max_new_tokens=64", "Did you mean 'sampling.max_new_tokens' (or 'eval.max_new_tokens')?"),
    ("min_pixels=3136", "Did you mean 'model.min_pixels'?"),
    ("optim.beta=0.5", "TRL's beta is `algorithm.beta` here; or did you mean 'betas'?"),
    # a near key in the same section keeps the old, local suggestion
    ("optim.lrr=1e-5", "unknown config key 'optim.lrr'. Did you mean 'lr'?"),
    ("sampling.temprature=1", "unknown config key 'sampling.temprature'. Did you mean 'temperature'?"),
    ("model.name_or_pth=x", "unknown config key 'model.name_or_pth'. Did you mean 'name_or_path'?"),
]


@pytest.mark.parametrize("override, expected", ALIASES, ids=[a[0] for a in ALIASES])
def test_unknown_key_suggests_the_right_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load(VISION_DEMO, [override])
    assert expected in str(info.value)
    assert "Valid keys here:" in str(info.value)


def test_alias_to_a_key_the_task_lacks_is_not_offered():
    # image_gen has no data.max_prompt_length: no pointer to a key that would be rejected in turn
    with pytest.raises(ConfigError) as info:
        load(IMAGE_GEN_DEMO, ["max_prompt_length=100"])
    assert "data.max_prompt_length" not in str(info.value)
    assert "unknown config key 'max_prompt_length'" in str(info.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "trl_style.yaml"
    path.write_text("task: vision\nnum_generations: 8\n")
    with pytest.raises(ConfigError, match="TRL's num_generations is `group_size` here"):
        load(path)


def test_non_string_yaml_key_is_a_config_error(tmp_path):
    path = tmp_path / "int_key.yaml"
    path.write_text("task: vision\n1: 2\n")
    with pytest.raises(ConfigError, match="unknown config key '1'"):
        load(path)
