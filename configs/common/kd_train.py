"""The ``train`` dict of DetKD runs: detectron2's ``common/train.py`` plus DetKD's keys."""

from detectron2 import model_zoo

train = model_zoo.get_config("common/train.py").train

# Weights of model.teacher, loaded strictly (every teacher parameter must be in the file):
# a detectron2:// model-zoo URL, a model-zoo .pkl, a .pth, or a DetKD run checkpoint.
# train.init_checkpoint loads into model.student only.
train.teacher_checkpoint = ""
# An empty teacher_checkpoint is an error unless this is True (tests, smoke runs only).
train.teacher_random_init = False
# Write OUTPUT_DIR/model_final_student.pth (the student alone, for stock detectron2).
train.export_student = True
# Evaluate the loaded teacher once before training; logged as teacher/bbox/AP etc.
train.teacher_eval_at_start = False
# Clip the global gradient norm before every optimizer step (the D3ETR COCO configs enable it).
train.clip_grad = dict(enabled=False, max_norm=0.1)
# On the CPU (glibc), memory a step frees stays in the process for the next step instead of
# going back to the OS and faulting back in page by page (detkd.utils.keep_freed_cpu_memory).
train.keep_freed_cpu_memory = True
# detectron2's default_setup seeds process r with seed + r (detectron2's default, -1, draws one).
train.seed = 0
