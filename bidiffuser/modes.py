"""The seven UniDiffuser sampling modes (kept import-light so `bidiffuser --help` is instant)."""

MODES = ("t2i", "i2t", "joint", "i", "t", "i2t2i", "t2i2t")
MODE_HELP = ("t2i: text to image | i2t: image to text | joint: image and text together | i: image only | "
             "t: text only | i2t2i: image variation | t2i2t: text variation")
