# signals that arrive while the heavy modules are still importing end the run quietly
from ._early import early_handlers

early_handlers()

from .cli import main  # noqa: E402

main(prog_name="ggufq")
