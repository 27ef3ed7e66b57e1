"""``python -m diffsolve.fid [fid|fid-ref|sweep] ...`` — the entry point for torchrun:

    torchrun --nproc_per_node N -m diffsolve.fid -- --model digits16 --steps 10 --num 10000 --ref ref.npz --workdir run/

(the ``--`` keeps torchrun from reading ``--num`` as its own ``--numa-binding``).
"""

import sys

from .cli import main

sys.exit(main())
