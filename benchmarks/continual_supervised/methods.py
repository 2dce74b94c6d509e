"""The methods of the supervised continual control, in report order, and their labels (shared by run and report)."""

METHODS = ("backprop", "l2", "er", "l2_er", "l2_init", "snp", "reset")
LABELS = {
    "backprop": "backprop",
    "l2": "L2",
    "er": "ER",
    "l2_er": "L2+ER",
    "l2_init": "L2-Init",
    "snp": "Shrink & Perturb",
    "reset": "reset every task",
}
