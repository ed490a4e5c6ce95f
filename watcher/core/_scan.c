/* watcher.core._scan: the change-list rules' per-entry work in C.
 *
 * A second implementation of Rules.scan / Rules.walk and LowerStack's resolution
 * (watcher/core/rules.py, watcher/core/layers.py): directory listing, lstat, whiteout and
 * opaque detection (overlay char device 0:0 and <prefix>opaque, aufs .wh.NAME and
 * .wh..wh..opq), redirects, and the comparison with B (rule 2). The Python code is the
 * reference: each function below names the Python function it follows, and
 * tests/test_native.py checks on random trees that both give the same answers. A change to a
 * rule is made in docs/rules.md, then in the Python, then here.
 *
 * Paths are root-relative byte strings ("/", "/a/b"), as in the Python. Every scan is done
 * with the GIL held (it is called from the event loop's thread and from the one-shot diff).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#define MAX_LAYERS 512
#define MASK_WORDS (MAX_LAYERS / 64)
#define XATTR_MAX_SIZE 65536

static const char AUFS_WH[] = ".wh.";
static const char AUFS_OPQ[] = ".wh..wh..opq";
static const char CAPABILITY[] = "security.capability";

/* ---- small buffers --------------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
} Buf;

static int buf_reserve(Buf *b, size_t need) {
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

/* b = a1 + a2 (+ a3), NUL-terminated. */
static const char *buf_join(Buf *b, const char *a1, size_t n1, const char *a2, size_t n2,
                            const char *a3, size_t n3) {
    if (buf_reserve(b, n1 + n2 + n3 + 1) < 0)
        return NULL;
    memcpy(b->p, a1, n1);
    memcpy(b->p + n1, a2, n2);
    if (n3)
        memcpy(b->p + n1 + n2, a3, n3);
    b->len = n1 + n2 + n3;
    b->p[b->len] = '\0';
    return b->p;
}

/* child_path(parent, name) into a new malloc'd string. */
static char *child_path(const char *parent, size_t plen, const char *name, size_t nlen,
                        size_t *out_len) {
    int root = plen == 1 && parent[0] == '/';
    size_t len = root ? 1 + nlen : plen + 1 + nlen;
    char *p = malloc(len + 1);
    if (p == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(p, parent, plen);
    size_t at = plen;
    if (!root)
        p[at++] = '/';
    memcpy(p + at, name, nlen);
    p[len] = '\0';
    *out_len = len;
    return p;
}

static int has_prefix(const char *s, size_t n, const char *prefix) {
    size_t k = strlen(prefix);
    return n >= k && memcmp(s, prefix, k) == 0;
}

static int is_whiteout(const struct stat *st) { return S_ISCHR(st->st_mode) && st->st_rdev == 0; }

/* ---- the context: one upper dir over one lower stack ---------------------------------- */

typedef struct {
    PyObject_HEAD
    char *upper;
    size_t ulen;
    int nlayers;
    char **layers;
    size_t *llen;
    int aufs;
    char *opaque_xattr, *redirect_xattr;
    char *xa, *xb; /* xattr value buffers */
    Buf p1, p2;    /* scratch paths */
} Scanner;

typedef struct {
    int present;
    struct stat st;
    int layer;
    uint64_t dl[MASK_WORDS]; /* dir_layers as a bitmap (the indices always ascend) */
} Base;

typedef struct {
    int has_base;
    uint64_t dl[MASK_WORDS]; /* the base directory's dir_layers */
    char *origin;            /* malloc'd; NULL for None */
    size_t olen;
    int in_upper;
} DState;

typedef struct {
    char *path; /* malloc'd */
    size_t plen;
    int kind; /* 0: None, else 'A', 'C', 'D' */
    int has_dir;
    DState dir;
    int has_st;
    struct stat st;
    unsigned long long ino;
} Child;

typedef struct {
    Child *v;
    size_t n, cap;
} Children;

static void dstate_clear(DState *d) {
    free(d->origin);
    d->origin = NULL;
}

static void children_free(Children *c) {
    for (size_t i = 0; i < c->n; i++) {
        free(c->v[i].path);
        if (c->v[i].has_dir)
            dstate_clear(&c->v[i].dir);
    }
    free(c->v);
    c->v = NULL;
    c->n = c->cap = 0;
}

static Child *children_add(Children *c) {
    if (c->n == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 16;
        Child *v = realloc(c->v, cap * sizeof(Child));
        if (v == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        c->v = v;
        c->cap = cap;
    }
    Child *ch = &c->v[c->n++];
    memset(ch, 0, sizeof(*ch));
    return ch;
}

static void mask_set(uint64_t *m, int i) { m[i / 64] |= (uint64_t)1 << (i % 64); }
static int mask_has(const uint64_t *m, int i) { return (m[i / 64] >> (i % 64)) & 1; }

static int raise_errno(const char *path) {
    PyObject *name = PyBytes_FromString(path);
    if (name != NULL) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        Py_DECREF(name);
    }
    return -1;
}

/* get_xattr (layers.py): 1 present (value in buf, *len), 0 absent, -1 error. */
static int get_xattr(const char *path, const char *name, char *buf, ssize_t *len) {
    ssize_t n = lgetxattr(path, name, buf, XATTR_MAX_SIZE);
    if (n >= 0) {
        *len = n;
        return 1;
    }
    if (errno == ENODATA || errno == ENOTSUP || errno == ENOENT || errno == EPERM)
        return 0;
    return raise_errno(path);
}

/* os.path.lexists: 1 when lstat succeeds, else 0 (any error is "not there"). */
static int lexists(const char *path) {
    struct stat st;
    if (lstat(path, &st) == 0)
        return 1;
    return 0; /* os.path.lexists: any OSError is False */
}

/* Rules._opaque (rules.py) and LowerStack._opaque (layers.py), on a full path. */
static int is_opaque(Scanner *s, const char *full, size_t flen) {
    if (s->aufs) {
        const char *p = buf_join(&s->p2, full, flen, "/", 1, AUFS_OPQ, strlen(AUFS_OPQ));
        if (p == NULL)
            return -1;
        return lexists(p);
    }
    ssize_t n;
    int r = get_xattr(full, s->opaque_xattr, s->xa, &n);
    if (r <= 0)
        return r;
    return n == 1 && s->xa[0] == 'y';
}

/* ---- B: LowerStack._resolve and lookup ------------------------------------------------- */

/* Directory descriptors of one directory of B, one per layer, opened when first needed: the
 * names of a scanned directory are looked up relative to them (fstatat), not by full path. */
typedef struct {
    int fd[MAX_LAYERS]; /* -1 not opened yet, -2 not openable (full paths are used) */
    int n;
} LowerFds;

static void fds_init(LowerFds *f, int n) {
    f->n = n;
    for (int i = 0; i < n; i++)
        f->fd[i] = -1;
}

static void fds_close(LowerFds *f) {
    for (int i = 0; i < f->n; i++)
        if (f->fd[i] >= 0)
            close(f->fd[i]);
}

/* LowerStack._resolve: the entry B has at path (whose last component is name), given the
 * parent's dir_layers. fds: the parent's descriptors, or NULL (full paths). 0 with
 * out->present set or not, -1 on error. */
static int resolve(Scanner *s, const char *path, size_t plen, const char *name, size_t nlen,
                   const uint64_t *parent_dl, LowerFds *fds, Base *out) {
    memset(out, 0, sizeof(*out));
    if (nlen == 0 || (s->aufs && has_prefix(name, nlen, AUFS_WH)))
        return 0; /* no listing holds these names */
    size_t parent_len = plen - nlen - 1;
    if (parent_len == 0)
        parent_len = 1; /* "/" */
    for (int i = 0; i < s->nlayers; i++) {
        if (!mask_has(parent_dl, i))
            continue;
        int fd = -2;
        if (fds != NULL) {
            if (fds->fd[i] == -1) {
                const char *dir =
                    buf_join(&s->p1, s->layers[i], s->llen[i], path, parent_len, "", 0);
                if (dir == NULL)
                    return -1;
                int opened = open(dir[0] ? dir : "/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                fds->fd[i] = opened >= 0 ? opened : -2;
            }
            fd = fds->fd[i];
        }
        if (s->aufs) {
            /* layer + child_path(parent, ".wh." + name) */
            int whited;
            if (fd >= 0) {
                const char *wh = buf_join(&s->p1, AUFS_WH, 4, name, nlen, "", 0);
                if (wh == NULL)
                    return -1;
                struct stat wst;
                whited = fstatat(fd, wh, &wst, AT_SYMLINK_NOFOLLOW) == 0;
            } else {
                const char *sep = (parent_len == 1) ? "" : "/";
                if (buf_reserve(&s->p1, s->llen[i] + parent_len + 1 + 4 + nlen + 1) < 0)
                    return -1;
                char *p = s->p1.p;
                size_t at = 0;
                memcpy(p + at, s->layers[i], s->llen[i]);
                at += s->llen[i];
                memcpy(p + at, path, parent_len);
                at += parent_len;
                memcpy(p + at, sep, strlen(sep));
                at += strlen(sep);
                memcpy(p + at, AUFS_WH, 4);
                at += 4;
                memcpy(p + at, name, nlen);
                at += nlen;
                p[at] = '\0';
                whited = lexists(p);
            }
            if (whited)
                break;
        }
        struct stat st;
        int rc;
        if (fd >= 0) {
            rc = fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW);
        } else {
            const char *full = buf_join(&s->p1, s->layers[i], s->llen[i], path, plen, "", 0);
            if (full == NULL)
                return -1;
            rc = lstat(full, &st);
        }
        if (rc != 0) {
            if (errno == ENOENT || errno == ENOTDIR)
                continue;
            const char *full = buf_join(&s->p1, s->layers[i], s->llen[i], path, plen, "", 0);
            return full == NULL ? -1 : raise_errno(full);
        }
        if (!s->aufs && is_whiteout(&st))
            break;
        if (!S_ISDIR(st.st_mode)) {
            if (!out->present) {
                out->present = 1;
                out->st = st;
                out->layer = i;
            }
            break;
        }
        if (!out->present) {
            out->present = 1;
            out->st = st;
            out->layer = i;
        }
        mask_set(out->dl, i);
        const char *full = buf_join(&s->p1, s->layers[i], s->llen[i], path, plen, "", 0);
        if (full == NULL)
            return -1;
        int opq = is_opaque(s, full, s->p1.len);
        if (opq < 0)
            return -1;
        if (opq)
            break;
    }
    return 0;
}

static int root_base(Scanner *s, Base *out) {
    memset(out, 0, sizeof(*out));
    if (s->nlayers == 0)
        return 0;
    const char *full = s->llen[0] ? s->layers[0] : "/";
    if (lstat(full, &out->st) != 0)
        return raise_errno(full);
    out->present = 1;
    out->layer = 0;
    for (int i = 0; i < s->nlayers; i++)
        mask_set(out->dl, i);
    return 0;
}

/* LowerStack.lookup for any path (redirects, origins): component by component from "/".
 * A component that no directory listing could hold (empty, ".", "..", a NUL byte) is not
 * there, as in the Python, which answers such names from the listing. */
static int lookup(Scanner *s, const char *path, size_t plen, Base *out) {
    if (root_base(s, out) < 0)
        return -1;
    if (plen == 1 && path[0] == '/')
        return 0;
    if (plen == 0 || path[0] != '/') {
        memset(out, 0, sizeof(*out));
        return 0;
    }
    size_t at = 1;
    while (out->present) {
        if (!S_ISDIR(out->st.st_mode)) {
            memset(out, 0, sizeof(*out));
            return 0;
        }
        const char *slash = memchr(path + at, '/', plen - at);
        size_t end = slash ? (size_t)(slash - path) : plen;
        const char *name = path + at;
        size_t nlen = end - at;
        if (nlen == 0 || (nlen == 1 && name[0] == '.') ||
            (nlen == 2 && name[0] == '.' && name[1] == '.') || memchr(name, '\0', nlen)) {
            memset(out, 0, sizeof(*out));
            return 0;
        }
        Base parent = *out;
        if (resolve(s, path, end, name, nlen, parent.dl, NULL, out) < 0)
            return -1;
        if (!slash)
            return 0;
        at = end + 1;
        if (at > plen) { /* trailing slash: an empty name */
            memset(out, 0, sizeof(*out));
            return 0;
        }
        if (at == plen) {
            memset(out, 0, sizeof(*out));
            return 0;
        }
    }
    return 0;
}

/* ---- names of one directory ------------------------------------------------------------ */

typedef struct {
    char *name; /* malloc'd */
    size_t nlen;
    int what; /* 0 present in U, 1 whiteout in U, 2 named by B only */
    struct stat st;
    unsigned long long ino;
} Name;

typedef struct {
    Name *v;
    size_t n, cap;
} Names;

static void names_free(Names *ns) {
    for (size_t i = 0; i < ns->n; i++)
        free(ns->v[i].name);
    free(ns->v);
    ns->v = NULL;
    ns->n = ns->cap = 0;
}

static Name *names_add(Names *ns, const char *name, size_t nlen, int what) {
    if (ns->n == ns->cap) {
        size_t cap = ns->cap ? ns->cap * 2 : 64;
        Name *v = realloc(ns->v, cap * sizeof(Name));
        if (v == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        ns->v = v;
        ns->cap = cap;
    }
    char *copy = malloc(nlen + 1);
    if (copy == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(copy, name, nlen);
    copy[nlen] = '\0';
    Name *e = &ns->v[ns->n++];
    e->name = copy;
    e->nlen = nlen;
    e->what = what;
    e->ino = 0;
    return e;
}

static int cmp_bytes(const char *a, size_t an, const char *b, size_t bn) {
    int c = memcmp(a, b, an < bn ? an : bn);
    if (c)
        return c;
    return an < bn ? -1 : an > bn;
}

static int cmp_name(const void *x, const void *y) {
    const Name *a = x, *b = y;
    int c = cmp_bytes(a->name, a->nlen, b->name, b->nlen);
    return c ? c : a->what - b->what; /* present first, then whiteout, then B only */
}

/* Sort and keep one per name, the one with the smallest ``what``. */
static void names_unique(Names *ns) {
    if (ns->n < 2)
        return;
    qsort(ns->v, ns->n, sizeof(Name), cmp_name);
    size_t w = 0;
    for (size_t r = 0; r < ns->n; r++) {
        if (w > 0 &&
            cmp_bytes(ns->v[w - 1].name, ns->v[w - 1].nlen, ns->v[r].name, ns->v[r].nlen) == 0) {
            free(ns->v[r].name);
            continue;
        }
        ns->v[w++] = ns->v[r];
    }
    ns->n = w;
}

static int dirent_is_dot(const struct dirent *d) {
    return d->d_name[0] == '.' &&
           (d->d_name[1] == '\0' || (d->d_name[1] == '.' && d->d_name[2] == '\0'));
}

/* A set of names (open addressing, FNV-1a), for LowerStack.names's ``seen``. */
typedef struct {
    char **key;
    size_t *klen;
    size_t n, cap;
} NameSet;

static uint64_t fnv(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    return h;
}

static void nameset_free(NameSet *ns) {
    for (size_t i = 0; i < ns->cap; i++)
        free(ns->key[i]);
    free(ns->key);
    free(ns->klen);
    memset(ns, 0, sizeof(*ns));
}

static int nameset_grow(NameSet *ns) {
    size_t cap = ns->cap ? ns->cap * 2 : 64;
    char **key = calloc(cap, sizeof(char *));
    size_t *klen = calloc(cap, sizeof(size_t));
    if (key == NULL || klen == NULL) {
        free(key);
        free(klen);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < ns->cap; i++) {
        if (ns->key[i] == NULL)
            continue;
        size_t j = fnv(ns->key[i], ns->klen[i]) & (cap - 1);
        while (key[j] != NULL)
            j = (j + 1) & (cap - 1);
        key[j] = ns->key[i];
        klen[j] = ns->klen[i];
    }
    free(ns->key);
    free(ns->klen);
    ns->key = key;
    ns->klen = klen;
    ns->cap = cap;
    return 0;
}

/* Add a name: 1 when it was new, 0 when already there, -1 on error. */
static int nameset_add(NameSet *ns, const char *name, size_t nlen) {
    if ((ns->n + 1) * 2 > ns->cap && nameset_grow(ns) < 0)
        return -1;
    size_t j = fnv(name, nlen) & (ns->cap - 1);
    while (ns->key[j] != NULL) {
        if (ns->klen[j] == nlen && memcmp(ns->key[j], name, nlen) == 0)
            return 0;
        j = (j + 1) & (ns->cap - 1);
    }
    char *copy = malloc(nlen + 1);
    if (copy == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(copy, name, nlen);
    copy[nlen] = '\0';
    ns->key[j] = copy;
    ns->klen[j] = nlen;
    ns->n++;
    return 1;
}

static int nameset_has(const NameSet *ns, const char *name, size_t nlen) {
    if (ns->cap == 0)
        return 0;
    size_t j = fnv(name, nlen) & (ns->cap - 1);
    while (ns->key[j] != NULL) {
        if (ns->klen[j] == nlen && memcmp(ns->key[j], name, nlen) == 0)
            return 1;
        j = (j + 1) & (ns->cap - 1);
    }
    return 0;
}

/* LowerStack.names: the names B shows in the directory at path (with dir_layers dl), in the
 * same order of decisions as the Python (a name seen before, in a higher layer or earlier in
 * the same listing, is not shown again). */
static int lower_names(Scanner *s, const char *path, size_t plen, const uint64_t *dl,
                       Names *out) {
    NameSet seen = {0};
    int rc = -1;
    for (int i = 0; i < s->nlayers; i++) {
        if (!mask_has(dl, i))
            continue;
        const char *full = buf_join(&s->p1, s->layers[i], s->llen[i], path, plen, "", 0);
        if (full == NULL)
            goto done;
        DIR *d = opendir(full);
        if (d == NULL) {
            raise_errno(full);
            goto done;
        }
        int dfd = dirfd(d);
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            if (dirent_is_dot(de))
                continue;
            const char *name = de->d_name;
            size_t nlen = strlen(name);
            if (s->aufs && has_prefix(name, nlen, AUFS_WH)) {
                if (!has_prefix(name, nlen, ".wh..wh.") &&
                    nameset_add(&seen, name + 4, nlen - 4) < 0) {
                    closedir(d);
                    goto done;
                }
                continue;
            }
            if (nameset_has(&seen, name, nlen))
                continue;
            if (nameset_add(&seen, name, nlen) < 0) {
                closedir(d);
                goto done;
            }
            if (!s->aufs) {
                unsigned char t = de->d_type;
                if (t != DT_REG && t != DT_DIR && t != DT_LNK) {
                    struct stat st;
                    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
                        int e = errno;
                        closedir(d);
                        errno = e;
                        raise_errno(s->p1.p);
                        goto done;
                    }
                    if (is_whiteout(&st))
                        continue;
                }
            }
            if (names_add(out, name, nlen, 2) == NULL) {
                closedir(d);
                goto done;
            }
        }
        closedir(d);
    }
    rc = 0;
done:
    nameset_free(&seen);
    return rc;
}

/* ---- the rules: Rules._classify, Rules.scan, Rules._scan_added --------------------------- */

static int mtime_equal(const struct stat *a, const struct stat *b) {
    if (a->st_mtim.tv_sec == b->st_mtim.tv_sec && a->st_mtim.tv_nsec == b->st_mtim.tv_nsec)
        return 1;
    return a->st_mtim.tv_sec == b->st_mtim.tv_sec &&
           (a->st_mtim.tv_nsec == 0 || b->st_mtim.tv_nsec == 0);
}

/* Rules._differs (rule 2). */
static int differs(Scanner *s, const struct stat *st, const char *source, const Base *base,
                   const char *path, size_t plen) {
    const struct stat *b = &base->st;
    if (st->st_mode != b->st_mode || st->st_uid != b->st_uid || st->st_gid != b->st_gid ||
        st->st_rdev != b->st_rdev)
        return 1;
    if (!S_ISDIR(st->st_mode) && (st->st_size != b->st_size || !mtime_equal(st, b)))
        return 1;
    ssize_t na = 0, nb = 0;
    int ra = get_xattr(source, CAPABILITY, s->xa, &na);
    if (ra < 0)
        return -1;
    const char *bp =
        buf_join(&s->p2, s->layers[base->layer], s->llen[base->layer], path, plen, "", 0);
    if (bp == NULL)
        return -1;
    int rb = get_xattr(bp, CAPABILITY, s->xb, &nb);
    if (rb < 0)
        return -1;
    if (ra != rb)
        return 1;
    return ra && (na != nb || memcmp(s->xa, s->xb, (size_t)na) != 0);
}

/* Rules._redirect: 1 with a malloc'd *out (the origin), 0 for None, -1 on error. */
static int redirect_of(Scanner *s, const char *upath, const char *parent_origin, size_t polen,
                       char **out, size_t *olen) {
    *out = NULL;
    if (s->aufs)
        return 0;
    ssize_t n;
    int r = get_xattr(upath, s->redirect_xattr, s->xa, &n);
    if (r <= 0)
        return r;
    if (n > 0 && s->xa[0] == '/') {
        char *p = malloc((size_t)n + 1);
        if (p == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(p, s->xa, (size_t)n);
        p[n] = '\0';
        *out = p;
        *olen = (size_t)n;
        return 1;
    }
    if (parent_origin == NULL)
        return 0;
    *out = child_path(parent_origin, polen, s->xa, (size_t)n, olen);
    return *out == NULL ? -1 : 1;
}

static int same(const char *a, size_t an, const char *b, size_t bn) {
    return a != NULL && b != NULL && an == bn && memcmp(a, b, an) == 0;
}

/* Rules._classify for one name: appends one child. ``ust`` NULL when U has no entry. */
static int classify(Scanner *s, const char *parent, size_t parlen, const DState *state,
                    LowerFds *fds, const Base *origin_base, const char *name, size_t nlen,
                    const struct stat *ust, unsigned long long ino, int whiteout, Children *out) {
    Child *ch = children_add(out);
    if (ch == NULL)
        return -1;
    ch->path = child_path(parent, parlen, name, nlen, &ch->plen);
    if (ch->path == NULL)
        return -1;
    const char *path = ch->path;
    size_t plen = ch->plen;
    Base base = {0};
    if (state->has_base && resolve(s, path, plen, name, nlen, state->dl, fds, &base) < 0)
        return -1;
    const struct stat *merged = ust;
    Base origin_entry = {0};
    /* src: where the merged entry's xattrs live (malloc'd here) */
    char *src = NULL;
    size_t srclen = 0;
    char *opath = NULL; /* child_path(state->origin, name) */
    size_t oplen = 0;
    int rc = -1;
    if (ust == NULL && !whiteout && state->origin != NULL) {
        if (same(state->origin, state->olen, parent, parlen)) { /* untouched lower entry */
            if (base.present) {
                ch->has_st = 1;
                ch->st = base.st;
            }
            return 0;
        }
        opath = child_path(state->origin, state->olen, name, nlen, &oplen);
        if (opath == NULL)
            return -1;
        if (origin_base->present && S_ISDIR(origin_base->st.st_mode) &&
            resolve(s, opath, oplen, name, nlen, origin_base->dl, NULL, &origin_entry) < 0)
            goto done;
        if (origin_entry.present) {
            merged = &origin_entry.st;
            const char *l = s->layers[origin_entry.layer];
            size_t ll = s->llen[origin_entry.layer];
            src = malloc(ll + oplen + 1);
            if (src == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(src, l, ll);
            memcpy(src + ll, opath, oplen);
            srclen = ll + oplen;
            src[srclen] = '\0';
        }
    }
    if (merged == NULL) {
        ch->kind = base.present ? 'D' : 0;
        rc = 0;
        goto done;
    }
    if (src == NULL) {
        src = malloc(s->ulen + plen + 1);
        if (src == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        memcpy(src, s->upper, s->ulen);
        memcpy(src + s->ulen, path, plen);
        srclen = s->ulen + plen;
        src[srclen] = '\0';
    }
    int is_dir = S_ISDIR(merged->st_mode);
    if (!base.present) {
        ch->kind = 'A';
    } else {
        int d = is_dir != S_ISDIR(base.st.st_mode);
        if (!d) {
            d = differs(s, merged, src, &base, path, plen);
            if (d < 0)
                goto done;
        }
        ch->kind = d ? 'C' : 0;
    }
    ch->has_st = 1;
    ch->st = *merged;
    ch->ino = ino;
    if (!is_dir) {
        rc = 0;
        goto done;
    }
    int dir_base = base.present && S_ISDIR(base.st.st_mode);
    ch->has_dir = 1;
    ch->dir.has_base = dir_base;
    if (dir_base)
        memcpy(ch->dir.dl, base.dl, sizeof(base.dl));
    if (ust == NULL) {
        ch->dir.in_upper = 0;
        if (state->origin != NULL) {
            ch->dir.origin = opath;
            ch->dir.olen = oplen;
            opath = NULL;
        }
        rc = 0;
        goto done;
    }
    ch->dir.in_upper = 1;
    int opq = 0;
    if (dir_base) {
        opq = is_opaque(s, src, srclen);
        if (opq < 0)
            goto done;
    }
    if (opq) {
        rc = 0; /* opaque: nothing of B shows through */
        goto done;
    }
    char *redirect = NULL;
    size_t rlen = 0;
    int r = redirect_of(s, src, state->origin, state->olen, &redirect, &rlen);
    if (r < 0)
        goto done;
    if (r > 0) {
        Base target;
        if (lookup(s, redirect, rlen, &target) < 0) {
            free(redirect);
            goto done;
        }
        if (target.present && S_ISDIR(target.st.st_mode)) {
            ch->dir.origin = redirect;
            ch->dir.olen = rlen;
        } else {
            free(redirect);
        }
    } else if (dir_base && same(state->origin, state->olen, parent, parlen)) {
        ch->dir.origin = malloc(plen + 1);
        if (ch->dir.origin == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        memcpy(ch->dir.origin, path, plen + 1);
        ch->dir.olen = plen;
    } else if (state->origin != NULL) {
        size_t clen;
        char *candidate = child_path(state->origin, state->olen, name, nlen, &clen);
        if (candidate == NULL)
            goto done;
        Base target;
        if (lookup(s, candidate, clen, &target) < 0) {
            free(candidate);
            goto done;
        }
        if (target.present && S_ISDIR(target.st.st_mode)) {
            ch->dir.origin = candidate;
            ch->dir.olen = clen;
        } else {
            free(candidate);
        }
    }
    rc = 0;
done:
    free(src);
    free(opath);
    return rc;
}

/* Rules._scan_added: nothing of B below; every entry is A. */
static int scan_added(Scanner *s, const char *path, size_t plen, Children *out) {
    const char *full = buf_join(&s->p1, s->upper, s->ulen, path, plen, "", 0);
    if (full == NULL)
        return -1;
    DIR *d = opendir(full);
    if (d == NULL)
        return raise_errno(full);
    int dfd = dirfd(d);
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (dirent_is_dot(de))
            continue;
        const char *name = de->d_name;
        size_t nlen = strlen(name);
        if (s->aufs && has_prefix(name, nlen, AUFS_WH))
            continue;
        unsigned char t = de->d_type;
        struct stat st;
        int have_st = 0;
        if (t == DT_UNKNOWN) {
            if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
                if (errno == ENOENT)
                    continue;
                closedir(d);
                return raise_errno(s->p1.p);
            }
            have_st = 1;
            t = S_ISDIR(st.st_mode) ? DT_DIR : S_ISREG(st.st_mode) ? DT_REG : DT_CHR;
        }
        if (t != DT_DIR && t != DT_REG && !s->aufs) {
            if (!have_st && fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
                if (errno == ENOENT)
                    continue;
                closedir(d);
                return raise_errno(s->p1.p);
            }
            if (is_whiteout(&st))
                continue;
        }
        Child *ch = children_add(out);
        if (ch == NULL) {
            closedir(d);
            return -1;
        }
        ch->path = child_path(path, plen, name, nlen, &ch->plen);
        if (ch->path == NULL) {
            closedir(d);
            return -1;
        }
        ch->kind = 'A';
        ch->ino = de->d_ino;
        if (t == DT_DIR) {
            ch->has_dir = 1;
            ch->dir.in_upper = 1;
            const char *upath = buf_join(&s->p2, s->upper, s->ulen, ch->path, ch->plen, "", 0);
            if (upath == NULL || redirect_of(s, upath, NULL, 0, &ch->dir.origin, &ch->dir.olen) < 0) {
                closedir(d);
                return -1;
            }
        }
    }
    closedir(d);
    return 0;
}

/* Rules.scan. */
static int scan(Scanner *s, const char *path, size_t plen, const DState *state, Children *out) {
    if (!state->has_base && state->origin == NULL)
        return scan_added(s, path, plen, out);
    Names ns = {0};
    int rc = -1;
    LowerFds fds;
    fds_init(&fds, s->nlayers);
    if (state->in_upper) {
        const char *full = buf_join(&s->p1, s->upper, s->ulen, path, plen, "", 0);
        if (full == NULL)
            return -1;
        DIR *d = opendir(full);
        if (d == NULL)
            return raise_errno(full);
        int dfd = dirfd(d);
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            if (dirent_is_dot(de))
                continue;
            const char *name = de->d_name;
            size_t nlen = strlen(name);
            if (s->aufs && has_prefix(name, nlen, AUFS_WH)) {
                if (!has_prefix(name, nlen, ".wh..wh.") &&
                    names_add(&ns, name + 4, nlen - 4, 1) == NULL) {
                    closedir(d);
                    goto done;
                }
                continue;
            }
            struct stat st;
            if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
                if (errno == ENOENT)
                    continue; /* removed since the listing */
                int e = errno;
                closedir(d);
                errno = e;
                raise_errno(s->p1.p);
                goto done;
            }
            int wh = !s->aufs && is_whiteout(&st);
            Name *e = names_add(&ns, name, nlen, wh ? 1 : 0);
            if (e == NULL) {
                closedir(d);
                goto done;
            }
            e->st = st;
            e->ino = de->d_ino;
        }
        closedir(d);
    }
    int origin_is_path = same(state->origin, state->olen, path, plen);
    Base origin_base = {0};
    if (state->origin != NULL) {
        if (origin_is_path) {
            origin_base.present = state->has_base;
            if (state->has_base) {
                origin_base.st.st_mode = S_IFDIR;
                memcpy(origin_base.dl, state->dl, sizeof(state->dl));
            }
        } else if (lookup(s, state->origin, state->olen, &origin_base) < 0) {
            goto done;
        }
    }
    if (!origin_is_path) {
        if (origin_base.present && S_ISDIR(origin_base.st.st_mode) &&
            lower_names(s, state->origin, state->olen, origin_base.dl, &ns) < 0)
            goto done;
        if (state->has_base && lower_names(s, path, plen, state->dl, &ns) < 0)
            goto done;
    }
    names_unique(&ns);
    for (size_t i = 0; i < ns.n; i++) {
        Name *e = &ns.v[i];
        if (classify(s, path, plen, state, &fds, &origin_base, e->name, e->nlen,
                     e->what == 0 ? &e->st : NULL, e->what == 0 ? e->ino : 0, e->what == 1,
                     out) < 0)
            goto done;
    }
    rc = 0;
done:
    fds_close(&fds);
    names_free(&ns);
    return rc;
}

/* ---- Rules.walk and compute -------------------------------------------------------------- */

typedef struct {
    char *path;
    size_t plen;
    int kind;
} Entry;

typedef struct {
    Entry *v;
    size_t n, cap;
} Entries;

static int entries_add(Entries *es, char *path, size_t plen, int kind) {
    if (es->n == es->cap) {
        size_t cap = es->cap ? es->cap * 2 : 1024;
        Entry *v = realloc(es->v, cap * sizeof(Entry));
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        es->v = v;
        es->cap = cap;
    }
    es->v[es->n++] = (Entry){path, plen, kind};
    return 0;
}

static int walk(Scanner *s, const char *path, size_t plen, const DState *state, Entries *out,
                int *changed) {
    if (PyErr_CheckSignals() < 0)
        return -1; /* Ctrl-C during a long walk: KeyboardInterrupt now, not at its end */
    Children ch = {0};
    if (scan(s, path, plen, state, &ch) < 0) {
        children_free(&ch);
        return -1;
    }
    int rc = 0;
    for (size_t i = 0; i < ch.n; i++) {
        Child *c = &ch.v[i];
        int kind = c->kind;
        if (c->has_dir) {
            int inner = 0;
            if (walk(s, c->path, c->plen, &c->dir, out, &inner) < 0) {
                rc = -1;
                break;
            }
            if (inner && kind == 0)
                kind = 'C';
        }
        if (kind != 0) {
            if (entries_add(out, c->path, c->plen, kind) < 0) {
                rc = -1;
                break;
            }
            c->path = NULL; /* owned by out */
            *changed = 1;
        }
    }
    children_free(&ch);
    return rc;
}

static int cmp_entry(const void *x, const void *y) {
    const Entry *a = x, *b = y;
    return cmp_bytes(a->path, a->plen, b->path, b->plen);
}

/* ---- the Python type ------------------------------------------------------------------- */

static void Scanner_dealloc(Scanner *s) {
    free(s->upper);
    for (int i = 0; i < s->nlayers; i++)
        free(s->layers[i]);
    free(s->layers);
    free(s->llen);
    free(s->opaque_xattr);
    free(s->redirect_xattr);
    free(s->xa);
    free(s->xb);
    free(s->p1.p);
    free(s->p2.p);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static char *dup_bytes(PyObject *b, size_t *len, const char *what) {
    if (!PyBytes_Check(b)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", what);
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(b);
    if (memchr(PyBytes_AS_STRING(b), '\0', (size_t)n) != NULL) {
        PyErr_Format(PyExc_ValueError, "%s: embedded null byte", what);
        return NULL;
    }
    char *p = malloc((size_t)n + 1);
    if (p == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(p, PyBytes_AS_STRING(b), (size_t)n);
    p[n] = '\0';
    if (len)
        *len = (size_t)n;
    return p;
}

static int Scanner_init(Scanner *s, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"upper", "layers", "aufs", "xattr_prefix", NULL};
    PyObject *upper, *layers, *prefix;
    int aufs;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "SO!pS", kwlist, &upper, &PyTuple_Type, &layers,
                                     &aufs, &prefix))
        return -1;
    if (s->upper != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner is already initialised");
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(layers);
    if (n > MAX_LAYERS) {
        PyErr_Format(PyExc_ValueError, "at most %d lower layers, got %zd", MAX_LAYERS, n);
        return -1;
    }
    s->upper = dup_bytes(upper, &s->ulen, "upper");
    if (s->upper == NULL)
        return -1;
    s->layers = calloc((size_t)n + 1, sizeof(char *));
    s->llen = calloc((size_t)n + 1, sizeof(size_t));
    if (s->layers == NULL || s->llen == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        s->layers[i] = dup_bytes(PyTuple_GET_ITEM(layers, i), &s->llen[i], "layer");
        if (s->layers[i] == NULL)
            return -1;
        s->nlayers = (int)i + 1;
    }
    s->aufs = aufs;
    size_t plen;
    char *p = dup_bytes(prefix, &plen, "xattr_prefix");
    if (p == NULL)
        return -1;
    s->opaque_xattr = malloc(plen + 16);
    s->redirect_xattr = malloc(plen + 16);
    s->xa = malloc(XATTR_MAX_SIZE);
    s->xb = malloc(XATTR_MAX_SIZE);
    if (!s->opaque_xattr || !s->redirect_xattr || !s->xa || !s->xb) {
        free(p);
        PyErr_NoMemory();
        return -1;
    }
    snprintf(s->opaque_xattr, plen + 16, "%sopaque", p);
    snprintf(s->redirect_xattr, plen + 16, "%sredirect", p);
    free(p);
    return 0;
}

static int ready(Scanner *s) {
    if (s->upper == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner is not initialised");
        return 0;
    }
    return 1;
}

/* changes(change_type, kinds) -> list: Rules.walk from the root, sorted by path bytes, each
 * entry change_type(path, kinds[i]) with i 0, 1, 2 for A, C, D. change_type must be a tuple
 * subclass of two items without extra fields (a NamedTuple). */
static PyObject *Scanner_changes(Scanner *s, PyObject *args) {
    PyTypeObject *ctype;
    PyObject *kinds;
    if (!PyArg_ParseTuple(args, "O!O!", &PyType_Type, &ctype, &PyTuple_Type, &kinds))
        return NULL;
    if (!ready(s))
        return NULL;
    if (!PyType_IsSubtype(ctype, &PyTuple_Type) ||
        ctype->tp_basicsize != PyTuple_Type.tp_basicsize || PyTuple_GET_SIZE(kinds) != 3) {
        PyErr_SetString(PyExc_TypeError, "changes() needs a NamedTuple type and three kinds");
        return NULL;
    }
    Base root;
    if (root_base(s, &root) < 0)
        return NULL;
    DState state = {0};
    state.has_base = root.present;
    memcpy(state.dl, root.dl, sizeof(root.dl));
    state.in_upper = 1;
    if (root.present) {
        state.origin = "/";
        state.olen = 1;
    }
    Entries es = {0};
    int changed = 0;
    PyObject *list = NULL;
    if (walk(s, "/", 1, &state, &es, &changed) == 0) {
        qsort(es.v, es.n, sizeof(Entry), cmp_entry);
        int gc_was_on = PyGC_Disable(); /* 2 objects per entry, no cycle: nothing to collect */
        list = PyList_New((Py_ssize_t)es.n);
        for (size_t i = 0; list != NULL && i < es.n; i++) {
            PyObject *path = PyBytes_FromStringAndSize(es.v[i].path, (Py_ssize_t)es.v[i].plen);
            PyObject *item = path != NULL ? ctype->tp_alloc(ctype, 2) : NULL;
            if (item == NULL) {
                Py_XDECREF(path);
                Py_CLEAR(list);
                break;
            }
            int k = es.v[i].kind;
            PyObject *kind = PyTuple_GET_ITEM(kinds, k == 'A' ? 0 : k == 'C' ? 1 : 2);
            Py_INCREF(kind);
            PyTuple_SET_ITEM(item, 0, path);
            PyTuple_SET_ITEM(item, 1, kind);
            PyList_SET_ITEM(list, (Py_ssize_t)i, item);
        }
        if (gc_was_on)
            PyGC_Enable();
    }
    for (size_t i = 0; i < es.n; i++)
        free(es.v[i].path);
    free(es.v);
    return list;
}

static PyObject *stat_type = NULL; /* os.stat_result */

static PyObject *stat_tuple(const struct stat *st) {
    PyObject *t = Py_BuildValue(
        "(KKKKKKLLLLdddNNNlLK)", (unsigned long long)st->st_mode, (unsigned long long)st->st_ino,
        (unsigned long long)st->st_dev, (unsigned long long)st->st_nlink,
        (unsigned long long)st->st_uid, (unsigned long long)st->st_gid, (long long)st->st_size,
        (long long)st->st_atim.tv_sec, (long long)st->st_mtim.tv_sec,
        (long long)st->st_ctim.tv_sec,
        (double)st->st_atim.tv_sec + st->st_atim.tv_nsec * 1e-9,
        (double)st->st_mtim.tv_sec + st->st_mtim.tv_nsec * 1e-9,
        (double)st->st_ctim.tv_sec + st->st_ctim.tv_nsec * 1e-9,
        PyLong_FromLongLong((long long)st->st_atim.tv_sec * 1000000000LL + st->st_atim.tv_nsec),
        PyLong_FromLongLong((long long)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec),
        PyLong_FromLongLong((long long)st->st_ctim.tv_sec * 1000000000LL + st->st_ctim.tv_nsec),
        (long)st->st_blksize, (long long)st->st_blocks, (unsigned long long)st->st_rdev);
    if (t == NULL)
        return NULL;
    PyObject *r = PyObject_CallOneArg(stat_type, t);
    Py_DECREF(t);
    return r;
}

static int parse_layers(PyObject *obj, uint64_t *dl, int nlayers) {
    memset(dl, 0, sizeof(uint64_t) * MASK_WORDS);
    if (!PyTuple_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "dir_layers must be a tuple of ints");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(obj); i++) {
        long v = PyLong_AsLong(PyTuple_GET_ITEM(obj, i));
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (v < 0 || v >= nlayers) {
            PyErr_Format(PyExc_ValueError, "layer index %ld out of range", v);
            return -1;
        }
        mask_set(dl, (int)v);
    }
    return 0;
}

/* scan(path, dir_layers, origin, in_upper, stats) -> list of (path, kind, dir, st, ino):
 * Rules.scan for one directory. dir_layers: the base's dir_layers, None when the state has no
 * base. kind: None or "A"/"C"/"D"; dir: None or (has_base, origin, in_upper); st: an
 * os.stat_result or None (always None when stats is false: making them is most of the cost).
 * Children come in no particular order (as in the Python). */
static PyObject *Scanner_scan(Scanner *s, PyObject *args) {
    PyObject *path, *layers, *origin;
    int in_upper, stats = 1;
    if (!PyArg_ParseTuple(args, "SOOp|p", &path, &layers, &origin, &in_upper, &stats))
        return NULL;
    if (!ready(s))
        return NULL;
    DState state = {0};
    state.in_upper = in_upper;
    if (layers != Py_None) {
        if (parse_layers(layers, state.dl, s->nlayers) < 0)
            return NULL;
        state.has_base = 1;
    }
    if (origin != Py_None) {
        if (!PyBytes_Check(origin)) {
            PyErr_SetString(PyExc_TypeError, "origin must be bytes or None");
            return NULL;
        }
        state.origin = PyBytes_AS_STRING(origin);
        state.olen = (size_t)PyBytes_GET_SIZE(origin);
    }
    const char *p = PyBytes_AS_STRING(path);
    size_t plen = (size_t)PyBytes_GET_SIZE(path);
    if (memchr(p, '\0', plen) != NULL) {
        PyErr_SetString(PyExc_ValueError, "path: embedded null byte");
        return NULL;
    }
    Children ch = {0};
    PyObject *list = NULL;
    if (scan(s, p, plen, &state, &ch) < 0)
        goto done;
    list = PyList_New((Py_ssize_t)ch.n);
    if (list == NULL)
        goto done;
    for (size_t i = 0; i < ch.n; i++) {
        Child *c = &ch.v[i];
        PyObject *dir = Py_None, *st = Py_None;
        Py_INCREF(Py_None);
        Py_INCREF(Py_None);
        if (c->has_dir) {
            Py_DECREF(dir);
            dir = Py_BuildValue("(Ny#N)", PyBool_FromLong(c->dir.has_base), c->dir.origin,
                                (Py_ssize_t)c->dir.olen, PyBool_FromLong(c->dir.in_upper));
        }
        if (c->has_st && stats) {
            Py_DECREF(st);
            st = stat_tuple(&c->st);
        }
        PyObject *item = NULL;
        if (dir != NULL && st != NULL) {
            char kind[2] = {(char)c->kind, 0};
            PyObject *k = c->kind ? PyUnicode_FromString(kind) : Py_NewRef(Py_None);
            item = k ? Py_BuildValue("(y#NOOK)", c->path, (Py_ssize_t)c->plen, k, dir, st,
                                     c->ino)
                     : NULL;
        }
        Py_XDECREF(dir);
        Py_XDECREF(st);
        if (item == NULL) {
            Py_CLEAR(list);
            goto done;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
done:
    children_free(&ch);
    return list;
}

static PyMethodDef Scanner_methods[] = {
    {"changes", (PyCFunction)Scanner_changes, METH_VARARGS,
     "changes(change_type, kinds) -> the sorted change list (Rules.walk from /)."},
    {"scan", (PyCFunction)Scanner_scan, METH_VARARGS,
     "scan(path, dir_layers, origin, in_upper, stats=True) -> children of one directory."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "watcher.core._scan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Scanner(upper, layers, aufs, xattr_prefix): the rules' scans for one branch.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "watcher.core._scan",
    "The change-list rules' per-entry work in C (see watcher/core/native.py).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void) {
    if (PyType_Ready(&ScannerType) < 0)
        return NULL;
    PyObject *os = PyImport_ImportModule("os");
    if (os == NULL)
        return NULL;
    stat_type = PyObject_GetAttrString(os, "stat_result");
    Py_DECREF(os);
    if (stat_type == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&scan_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
