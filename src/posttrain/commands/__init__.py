"""The commands a user types: ``posttrain <recipe>`` and one module per other command (demo, eval, pipeline,
report, audit-verifier, make-pairs, plan). Each is thin: parse the arguments, load the config, call the layer
below, print.

May import every other package (this is the top layer). ``commands.main`` imports a command's module only
when that command runs, so ``posttrain --help`` imports no torch.
"""
