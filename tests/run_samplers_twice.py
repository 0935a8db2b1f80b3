"""Run under torchrun by test_sampler_cli.py: every sampler through generate_dg.run into OUT/<sampler>."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate_dg  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402

out, net, disc, cls = sys.argv[1:5]
for name in ('heun', 'euler', 'dpmpp2m', 'restart'):
    generate_dg.run(net, os.path.join(out, name), '0-4', max_batch_size=2, disc_path=disc, classifier_path=cls,
                    device='cpu', sampler=name, num_steps=4, S_churn=(3.0 if name in ('heun', 'euler') else None))
dist.shutdown()
