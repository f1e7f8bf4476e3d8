"""The file table: one mapped file per table version, its kernels, write-ahead log, publish protocol,
check and repair, and the store (a folder of tables). See ARCHITECTURE.md, "Table file format"."""
