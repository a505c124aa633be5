"""Misspelt ``train`` keys in a LazyConfig file stop the run before anything is built, with the
key the config meant; keys of one's own that are no near miss of a read key stay allowed."""

import glob
import os
import re

from detectron2.config import LazyConfig

import pytest
from conftest import REPO

# A user's config file, as the README's "Your own data and models" example writes one: DetKD's
# config by path, then its own settings of train.
_USER_CONFIG = """\
from detectron2.config import LazyConfig

base = LazyConfig.load({base!r})
model, dataloader, optimizer, lr_multiplier, train = (
    base.model, base.dataloader, base.optimizer, base.lr_multiplier, base.train
)
{line}
"""


def _user_cfg(tmp_path, line, base="configs/demo/pkd_retinanet.py"):
    path = tmp_path / "my_kd.py"
    path.write_text(_USER_CONFIG.format(base=os.path.join(REPO, base), line=line))
    return LazyConfig.load(str(path))


@pytest.mark.parametrize(
    "line, key, meant",
    [
        (
            "train.teacher_eval_at_strat = True",
            "train.teacher_eval_at_strat",
            "train.teacher_eval_at_start",
        ),
        ("train.export_studnet = False", "train.export_studnet", "train.export_student"),
        ("train.clip_grad.max_nrom = 0.5", "train.clip_grad.max_nrom", "train.clip_grad.max_norm"),
        ("train.max_ite = 100", "train.max_ite", "train.max_iter"),
        (
            "train.teacher_chekpoint = 'x.pth'",
            "train.teacher_chekpoint",
            "train.teacher_checkpoint",
        ),
        ("train.eval_perod = 10", "train.eval_perod", "train.eval_period"),
        ("train.MAX_ITER = 100", "train.MAX_ITER", "train.max_iter"),  # yacs habits
        ("train.checkpointer.perod = 10", "train.checkpointer.perod", "train.checkpointer.period"),
        (
            "train.ddp.find_unused_parameter = True",
            "train.ddp.find_unused_parameter",
            "train.ddp.find_unused_parameters",
        ),
        ("train.amp.enable = True", "train.amp.enable", "train.amp.enabled"),
        ("train.sed = 1", "train.sed", "train.seed"),  # detectron2's default_setup reads seed
    ],
)
def test_misspelt_train_key_of_a_config_file_stops_the_trainer(tmp_path, line, key, meant):
    from detkd.engine import KDTrainer

    cfg = _user_cfg(tmp_path, line)
    with pytest.raises(ValueError, match=re.escape(f"Did you mean {meant}?")) as e:
        KDTrainer(cfg)  # raises before the model, the data or the output folder are built
    assert str(e.value).startswith(f"{key}: the config sets {key.rsplit('.', 1)[1]!r}")


def test_misspelt_key_names_what_the_run_would_keep(tmp_path):
    from detkd.config_checks import _check_train_settings

    cfg = _user_cfg(tmp_path, "train.teacher_eval_at_strat = True")
    with pytest.raises(ValueError, match="keep train.teacher_eval_at_start at False"):
        _check_train_settings(cfg)
    cfg = _user_cfg(tmp_path, "train.clip_grad.max_nrom = 0.5")
    norm = cfg.train.clip_grad.max_norm  # the demo config's, not the default 0.1
    with pytest.raises(ValueError, match=re.escape(f"keep train.clip_grad.max_norm at {norm!r}")):
        _check_train_settings(cfg)


@pytest.mark.parametrize(
    "line",
    [
        "train.my_note = 'x'",
        "train.teacher_eval_at_end = True",  # 0.80 of teacher_eval_at_start: below the cutoff
        "train.student_checkpoint = 'runs/s.pth'",
        "train.extra = dict(a=1, perod=2)",  # dicts of one's own are not searched
        "train.amp.note = 'x'",
        "train.clip_grad.note = 'x'",
    ],
)
def test_train_keys_of_ones_own_stay_allowed(tmp_path, line):
    from detkd.config_checks import _check_train_settings

    _check_train_settings(_user_cfg(tmp_path, line))


@pytest.mark.parametrize(
    "line, key",
    [
        ("train.checkpointer.keep_last = 3", "train.checkpointer.keep_last"),
        ("train.ddp.my_flag = True", "train.ddp.my_flag"),
    ],
)
def test_unknown_keyword_of_checkpointer_or_ddp_is_an_error(tmp_path, line, key):
    # every key of these two dicts is a keyword argument: a TypeError deep in the run otherwise
    from detkd.config_checks import _check_train_settings

    with pytest.raises(ValueError, match=re.escape(f"{key}: every key of")):
        _check_train_settings(_user_cfg(tmp_path, line))


CONFIGS = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)
    if not p.endswith("__init__.py")
)


def test_every_config_passes_the_train_key_check():
    from detkd.config_checks import _check_train_settings

    checked = 0
    for path in CONFIGS:
        cfg = LazyConfig.load(os.path.join(REPO, path))
        if "train" not in cfg:  # configs/common/ pieces without a train dict
            continue
        _check_train_settings(cfg)
        checked += 1
    assert checked >= 30, checked


@pytest.mark.parametrize(
    "line, match",
    [
        (
            "train.checkpointer.max_to_keep = 2.5",
            r"^train\.checkpointer\.max_to_keep must be an int >= 1 .* got 2\.5\.$",
        ),
        ("train.checkpointer.period = True", r"^train\.checkpointer\.period must be .* got True;"),
        ("train.log_period = float('inf')", r"^train\.log_period must be an int >= 1 .* got inf;"),
        (
            "train.clip_grad.max_norm = True",
            r"^train\.clip_grad\.max_norm must be a number > 0 .* got True:",
        ),
        (
            "train.clip_grad.max_norm = float('inf')",
            r"^train\.clip_grad\.max_norm must be a number > 0 .* got inf:",
        ),
    ],
)
def test_train_settings_that_are_no_whole_number_or_no_finite_limit_are_errors(
    tmp_path, line, match
):
    # a bool is no count of iterations, a fraction no number of checkpoints, inf no limit
    from detkd.config_checks import _check_train_settings

    cfg = _user_cfg(tmp_path, line)
    assert cfg.train.clip_grad.enabled  # the demo config clips: max_norm is read
    with pytest.raises(ValueError, match=match):
        _check_train_settings(cfg)


def test_train_settings_left_out_are_read_at_their_defaults(tmp_path):
    # detectron2 reads train.log_period with a default (20) and max_to_keep None keeps all; a
    # clip_grad that is a value, not a dict (False: no clipping), has no keys to check
    from detkd.config_checks import _check_train_settings

    _check_train_settings(
        _user_cfg(tmp_path, "del train['log_period']\ntrain.checkpointer.max_to_keep = None")
    )
    _check_train_settings(_user_cfg(tmp_path, "train.clip_grad = False"))
