# Augmenting declarations for the compiled fast path (setup.py); ndjson.py is the fallback.
cpdef bytes sort_key(object event_time)
cpdef bytes encode_row(dict row)
