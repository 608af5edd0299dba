"""The tamper-evident audit journal (``docs/audit.md``).

* :mod:`.chain`: the per-node hash chain (pure); the store chains records inside its
  transactions (``medrelay_server.store.audit``).
* :mod:`.merkle`: RFC 9162 trees and proofs (pure); :mod:`.anchor`: signed tree heads over
  the log of chain heads (pure).
* :mod:`.signer`, :mod:`.witness`, :mod:`.syslog`: where anchors are signed and witnessed;
  :mod:`.anchoring`: the service that makes them.
* :mod:`.verify`: recompute every chain and anchor; :mod:`.queries`: who-saw and trails;
  :mod:`.fhir`: FHIR R4 AuditEvent export; :mod:`.delivery`: batched delivery and receipt
  records; :mod:`.retention`: purging on the retention schedule.

Importing this package loads nothing; import the modules.
"""
