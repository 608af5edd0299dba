"""Who may sign in, and as whom: the Medical Council register, accounts, sign-in sessions,
tablet enrollments, the practitioner directory and the re-check job.

Import the submodules you need (:mod:`.db`, :mod:`.importer`, :mod:`.directory`,
:mod:`.recheck`); this package itself loads nothing, so :mod:`medrelay_server.store.schema`
can import :mod:`.schema` without a cycle.
"""
