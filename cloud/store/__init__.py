"""What the cloud keeps: the SQL schema and records, the object store and its key layout,
stored windows and registered data sets."""
