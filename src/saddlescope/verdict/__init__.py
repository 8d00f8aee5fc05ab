"""The pieces of the verdict, behind :func:`saddlescope.critical.analyze` (the door; its docstring has the
argument):

- :mod:`~saddlescope.verdict.point`: the record (:class:`~saddlescope.verdict.point.CriticalPoint`), its
  thresholds and the second-order test on a spectrum;
- :mod:`~saddlescope.verdict.exact`: the exact path (the whole spectrum, the zero band, the null-space probe);
- :mod:`~saddlescope.verdict.iterative`: the iterative path (both ends by Lanczos, the index estimate);
- :mod:`~saddlescope.verdict.ends`: what the two ends of a Lanczos spectrum prove, and each number as what
  it is;
- :mod:`~saddlescope.verdict.sharpen`: a certificate's direction sharpened for the escape.
"""
