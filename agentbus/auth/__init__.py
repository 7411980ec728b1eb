"""Who is calling: principals and how a request is mapped to one."""
