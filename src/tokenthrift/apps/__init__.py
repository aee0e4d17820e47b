"""Entry points that compose the layers below: one module per subcommand of the command line, each owning its flags
(``add_arguments``) and its work (``run``), assembled by :mod:`.cli` from one table (:data:`.cli.COMMANDS`); what
several share (:mod:`.common`); and what they call and benchmark scripts import: checkpoint evaluation
(:mod:`.evaluation`), the ReViT labelling and adaptive-evaluation pipeline (:mod:`.labels`), export
(:mod:`.export`), the one-harness comparison (:mod:`.compare`), the demo (:mod:`.demo`), every method's rows
(:mod:`.variants`), tables (:mod:`.report`) and pictures (:mod:`.visualize`, drawn with :mod:`tokenthrift.viz`).
Nothing below imports from here.
"""
