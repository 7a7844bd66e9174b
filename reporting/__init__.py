"""Reports and figures, TensorFlow-free: the HTML page of ``drpipe report``
(:mod:`reporting.report`, its quality section :mod:`reporting.quality`) and every matplotlib
figure drpipe draws (:mod:`reporting.plots`, also used by training for its run plots)."""
