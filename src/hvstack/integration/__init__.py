"""Integration services: the host's side of the guest agent (qemu-ga) in every guest.

Heartbeat and time sync (:mod:`.heartbeat`), commands and files in the guest
(:mod:`.guest_io`), file copies (:mod:`.copy`), file system freezes (:mod:`.freeze`),
KVP and the operations that compose them (:mod:`.ops`), and the pure rules they follow
(:mod:`.rules`). See docs/integration-services.md.
"""
