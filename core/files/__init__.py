"""Files users attach: downloaded by the worker, read into what the model gets.

- :mod:`core.files.download`: one streamed, size-limited HTTP download that never
  carries a platform token to another host.
- :mod:`core.files.read`: the bytes as an image part (vision models), or as text for
  the context (text files, PDFs), or a :class:`core.errors.FileRefusedError` with a
  reason the user can read.
- :mod:`core.files.attach`: all files of one message: fetched through the platform's
  responder factory, read, and turned into the user message the model gets and the
  notices the reply carries.
"""
