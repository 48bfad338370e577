"""Other projects' file layouts <-> this project's stores (:mod:`.fkd_layout`: the published FKD soft labels)."""
