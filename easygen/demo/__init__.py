"""The shapes-world demo: a tiny synthetic world that trains a working EasyGen end to end on CPU."""
