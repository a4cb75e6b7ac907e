# Augmenting declarations for the compiled fast path (setup.py): healthkit.py stays the one
# source of the logic and is itself the pure-Python fallback. Only leaf helpers of the row
# builder are typed; their module-internal calls then skip Python's call protocol. Typing
# the row builder as a cdef class saved ~1% more and would tie its attributes to this file.
cimport cython

cpdef dict _decode_attrs(dict attrs)

@cython.locals(ms=str, key=str)
cpdef tuple convert_date(str raw)

@cython.locals(h=cython.long, mnt=cython.long, sec=cython.long, t=cython.long, shift=cython.long,
               east=cython.long)
cpdef tuple _convert_date(str raw)

cpdef object to_number(str v)
cpdef object _num(object v)
cdef dict _key_attrs(dict attrs)
cdef list _key_node(tuple node)
cpdef str element_key(str tag, dict attrs, object children, object text=*)
cdef dict _generic(tuple node)
cdef object _meta_pair(tuple node)
cdef tuple _split_metadata(object children)
cdef dict _extra(dict attrs, frozenset known)
cdef void _dates(dict row, dict attrs, tuple pairs)
