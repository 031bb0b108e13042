"""Where a shard's images come from, behind one interface: loose files and objects, WebDataset tar
members, and image bytes in Parquet rows. A shard names one `Source` (a list of paths, or one
container file and a range in it); `iter_items(source, policy)` gives its images as `SourceItem`s
(the row's path, its bytes or its error, and the columns that join the row back to its source).
"""
