# Augmenting declarations for the compiled fast path (setup.py); keys.py is the fallback.
cpdef bytes canonical_bytes(object value)
cpdef str record_key(str source, str kind, object content)
