"""Virtual switches: Linux bridges, tap ports, nftables guards and ACLs, tc shaping and
mirroring, dnsmasq for NAT switches. :mod:`.model` holds the pure switch and port
settings, :mod:`.names` the kernel names, :mod:`.backend` the seam the host service
drives (the Linux backend and a fake for tests implement it)."""
