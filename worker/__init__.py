"""The worker side: the only package that imports torch, transformers and peft."""

import warnings

# peft calls a transformers property that transformers 5 deprecated; the warning is theirs, and
# printed once per job it buries graftq's own output.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
