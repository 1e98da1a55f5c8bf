"""Resource metering (Hyper-V's Measure-VM): raw counters in, totals since enabled or
last reset out; pure data and functions (:mod:`.model`, :mod:`.accounting`)."""
