"""The TID job service's API side: settings, database, REST app and the `tid` CLI.

Never imports torch (a test asserts it): the API validates specs with `tid_core.spec` and
enqueues work by task name.
"""
