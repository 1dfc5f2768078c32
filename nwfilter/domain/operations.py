"""The verbs of the domain lifecycle operations, in the order the API and
the command line list them.  What each does is `LIFECYCLE` in
`nwfilter.domain.lifecycle`; this module imports nothing, so the API table
can name them without loading the domain core."""

VERBS: tuple[str, ...] = (
    "undefine", "start", "shutdown", "destroy", "suspend", "resume", "reboot",
)
