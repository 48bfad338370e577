"""Self-supervised objectives shared by the SSL teachers (:mod:`fkd_ssl.ssl`) and the student's own SSL term."""
