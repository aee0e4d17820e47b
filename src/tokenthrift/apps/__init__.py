"""Entry points that compose the layers below: the command line (:mod:`.cli`, argument parsing only), the
demo, benchmarks and comparisons (:mod:`.bench`, :mod:`.report`), checkpoint evaluation
(:mod:`.evaluation`), the ReViT labelling and adaptive-evaluation pipeline (:mod:`.labels`), and pictures
(:mod:`.visualize`, drawn with :mod:`tokenthrift.viz`). Nothing below imports from here.
"""
