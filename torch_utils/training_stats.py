"""Training statistics under the name NVlabs' EDM2 imports (`from torch_utils import training_stats`).

Every EDM2 pickle stores its loss, `EDM2Loss`, with the source of EDM2's whole
training-loop module, and that source imports this module; loading such a pickle
with its code (`--trust_pickle`) therefore needs the name to exist. This project
does not collect statistics: `report` and `report0` return their value unchanged,
which is all the loaded code needs (docs/compat.md, "EDM2 networks and pickles").
"""

def report(name, value):
    """Record `value` under `name` (not collected here); returns value."""
    del name
    return value

def report0(name, value):
    """As `report`, for statistics only rank 0 reports; returns value."""
    del name
    return value
